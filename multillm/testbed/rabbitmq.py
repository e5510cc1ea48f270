"""RabbitMQ administration for the chaos run, the benchmark and the tests: rabbitmqctl, scratch vhosts."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from multillm.urls import NODE_SEPARATOR, broker_nodes

# Where RabbitMQ's management plugin serves its HTTP API (its default).
MANAGEMENT_PORT = 15672


def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl -q ARGS` on this machine's broker; returns what it printed."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


def vhost_of(broker_url: str) -> str:
    """The vhost of `broker_url`, or of the first node of a list (the nodes of one cluster share it)."""
    return unquote(urlsplit(broker_nodes(broker_url)[0]).path.lstrip("/"))


@contextmanager
def scratch_vhost(broker_url: str, prefix: str) -> Iterator[str]:
    """`broker_url` (one URL or a node list) moved to a fresh vhost (the URL's user may do anything
    there), deleted afterwards.

    Made through the broker's management API when it answers (tens of milliseconds), else by this
    machine's rabbitmqctl, which boots an Erlang VM for each step (about half a second each).
    """
    nodes = [urlsplit(node) for node in broker_nodes(broker_url)]
    vhost = f"{prefix}-{uuid.uuid4().hex[:12]}"
    user = unquote(nodes[0].username or "guest")
    admin = _management_api(nodes[0].hostname or "localhost", user, unquote(nodes[0].password or "guest"))
    admin = admin or _Rabbitmqctl()
    admin.add(vhost)
    try:
        admin.permit(vhost, user)
        path = "/" + quote(vhost, safe="")
        yield NODE_SEPARATOR.join(urlunsplit(node._replace(path=path)) for node in nodes)
    finally:
        admin.delete(vhost)


class _Admin(Protocol):
    """Makes vhosts and lets a user do anything in them."""

    def add(self, vhost: str) -> None: ...
    def permit(self, vhost: str, user: str) -> None: ...
    def delete(self, vhost: str) -> None: ...


class _Rabbitmqctl:
    def add(self, vhost: str) -> None:
        rabbitmqctl("add_vhost", vhost)

    def permit(self, vhost: str, user: str) -> None:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def delete(self, vhost: str) -> None:
        rabbitmqctl("delete_vhost", vhost)


class _ManagementApi:
    """The management HTTP API of the broker at `base` (`http://host:15672/api/`)."""

    def __init__(self, base: str, user: str, password: str) -> None:
        self._base = base
        self._token = base64.b64encode(f"{user}:{password}".encode()).decode()

    def add(self, vhost: str) -> None:
        self._call("PUT", f"vhosts/{quote(vhost, safe='')}")

    def permit(self, vhost: str, user: str) -> None:
        path = f"permissions/{quote(vhost, safe='')}/{quote(user, safe='')}"
        self._call("PUT", path, {"configure": ".*", "write": ".*", "read": ".*"})

    def delete(self, vhost: str) -> None:
        self._call("DELETE", f"vhosts/{quote(vhost, safe='')}")

    def _call(self, method: str, path: str, body: dict[str, str] | None = None) -> None:
        request = urllib.request.Request(
            self._base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {self._token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60):
            pass


@cache
def _management_api(host: str, user: str, password: str) -> _Admin | None:
    """The management HTTP API of the broker on `host`, or None when none answers there (the plugin
    `rabbitmq_management`, which `scripts/services.sh broker` enables)."""
    api = _ManagementApi(f"http://{host}:{MANAGEMENT_PORT}/api/", user, password)
    try:
        api._call("GET", "overview")
    except (OSError, urllib.error.HTTPError):
        return None
    return api

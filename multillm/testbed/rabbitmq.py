"""RabbitMQ administration for the chaos run, the benchmark and the tests: rabbitmqctl, scratch vhosts."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, partial
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
    api = _management_api(nodes[0].hostname or "localhost", user, unquote(nodes[0].password or "guest"))
    name = quote(vhost, safe="")
    undo: Callable[[], object]
    if api is not None:
        api("PUT", f"vhosts/{name}")
        undo = partial(api, "DELETE", f"vhosts/{name}")
    else:
        rabbitmqctl("add_vhost", vhost)
        undo = partial(rabbitmqctl, "delete_vhost", vhost)
    try:
        if api is not None:
            api("PUT", f"permissions/{name}/{quote(user, safe='')}", {"configure": ".*", "write": ".*", "read": ".*"})
        else:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield NODE_SEPARATOR.join(urlunsplit(node._replace(path="/" + name)) for node in nodes)
    finally:
        undo()


_Api = Callable[..., None]


@cache
def _management_api(host: str, user: str, password: str) -> _Api | None:
    """A caller of the management HTTP API of the broker on `host`, or None when none answers
    there (the plugin `rabbitmq_management`, which `scripts/services.sh broker` enables)."""
    base = f"http://{host}:{MANAGEMENT_PORT}/api/"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(method: str, path: str, body: dict[str, str] | None = None) -> None:
        request = urllib.request.Request(
            base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60):
            pass

    try:
        call("GET", "overview")
    except (OSError, urllib.error.HTTPError):
        return None
    return call

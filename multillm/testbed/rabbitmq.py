"""RabbitMQ administration for the chaos run, the benchmark and the tests: rabbitmqctl, scratch vhosts."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from multillm.urls import NODE_SEPARATOR, broker_nodes


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
    there), deleted afterwards. The vhost is made by this machine's rabbitmqctl."""
    nodes = [urlsplit(node) for node in broker_nodes(broker_url)]
    vhost = f"{prefix}-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, nodes[0].username or "guest", ".*", ".*", ".*")
        path = "/" + quote(vhost, safe="")
        yield NODE_SEPARATOR.join(urlunsplit(node._replace(path=path)) for node in nodes)
    finally:
        rabbitmqctl("delete_vhost", vhost)


_ACTING_USER = "multillm-testbed"


def _binaries(names: list[str]) -> str:
    return "[" + ", ".join(f'<<"{name}">>' for name in names) + "]"


def add_vhosts(names: list[str], user: str) -> None:
    """Add the vhosts `names`, `user` may do anything in each: one `rabbitmqctl eval` for all of
    them (each rabbitmqctl run boots an Erlang VM, half a second), or one run per step where the
    broker's internal API differs from the one used here (that of RabbitMQ 3.10)."""
    assert all(name.replace("-", "").isalnum() for name in [*names, user]), "names go into Erlang code"
    code = (
        f'[begin rabbit_vhost:add(V, <<"{_ACTING_USER}">>), rabbit_auth_backend_internal:set_permissions('
        f'<<"{user}">>, V, <<".*">>, <<".*">>, <<".*">>, <<"{_ACTING_USER}">>) end || V <- {_binaries(names)}], ok.'
    )
    try:
        rabbitmqctl("eval", code)
    except subprocess.CalledProcessError:
        for name in names:
            rabbitmqctl("add_vhost", name)
            rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")


def delete_vhosts(names: list[str]) -> None:
    """Delete the vhosts `names` (and their queues), in one `rabbitmqctl eval` where it can."""
    if not names:
        return
    assert all(name.replace("-", "").isalnum() for name in names), "names go into Erlang code"
    try:
        rabbitmqctl("eval", f'[rabbit_vhost:delete(V, <<"{_ACTING_USER}">>) || V <- {_binaries(names)}], ok.')
    except subprocess.CalledProcessError:
        for name in names:
            rabbitmqctl("delete_vhost", name)


class VhostPool:
    """Scratch vhosts on the broker of `broker_url`, made `batch` at a time and deleted together by
    `close`: a test suite's vhost each, for the cost of a few rabbitmqctl runs in all."""

    def __init__(self, broker_url: str, prefix: str, batch: int = 16) -> None:
        self._node = urlsplit(broker_nodes(broker_url)[0])
        self._prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self._batch = batch
        self._ready: list[str] = []
        self._made: list[str] = []

    def take(self) -> str:
        """The URL of a vhost nobody has used."""
        if not self._ready:
            names = [f"{self._prefix}-{len(self._made) + i}" for i in range(self._batch)]
            add_vhosts(names, self._node.username or "guest")
            self._made += names
            self._ready += names
        vhost = self._ready.pop(0)
        return urlunsplit(self._node._replace(path="/" + quote(vhost, safe="")))

    def close(self) -> None:
        delete_vhosts(self._made)
        self._made, self._ready = [], []

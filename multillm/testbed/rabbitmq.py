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

"""A three-node RabbitMQ cluster on this machine, for the cluster tests, the chaos run and the benchmark.

scripts/cluster.sh starts and stops it; this wraps the script and adds what a test asks of a
cluster: kill a node and start it again, see which nodes run, find a quorum queue's leader,
scratch vhosts. Every rabbitmqctl goes through the script, which runs it as the rabbitmq user:
the nodes share the system's Erlang cookie, which lives in that user's home.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster.sh"
DEFAULT_PORTS = (5681, 5682, 5683)
DEFAULT_BASE = "/tmp/multillm-cluster"


class ClusterError(RuntimeError):
    """scripts/cluster.sh failed; the message carries what it said on stderr."""


class LocalCluster:
    """The nodes multillm-1@localhost .. multillm-3@localhost, AMQP on 127.0.0.1 at `ports`."""

    def __init__(self, ports: Sequence[int] = DEFAULT_PORTS, base: str = DEFAULT_BASE) -> None:
        self.ports = tuple(ports)
        self.names = tuple(f"multillm-{i}@localhost" for i in range(1, len(self.ports) + 1))
        self._env = {
            **os.environ,
            "MULTILLM_CLUSTER_PORTS": " ".join(map(str, self.ports)),
            "MULTILLM_CLUSTER_BASE": base,
        }

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Whole when it returns: a cluster already up and whole is kept, anything less is wiped and started afresh."""
        self._script("up", timeout=180)

    def stop(self) -> None:
        self._script("down", timeout=120)

    def node_urls(self, vhost: str = "/") -> list[str]:
        """One URL a node, in node order: for a client that must talk to one node in particular."""
        return [f"amqp://guest:guest@127.0.0.1:{port}/{quote(vhost, safe='')}" for port in self.ports]

    def urls(self, vhost: str = "/") -> str:
        """Every node's URL joined by ';', kombu's failover form: a client moves on to the next node when one dies."""
        return ";".join(self.node_urls(vhost))

    def rabbitmqctl(self, node: str, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -q -n NODE ARGS`; returns what it printed."""
        return self._script("ctl", node, *args, timeout=timeout)

    def kill(self, node: str) -> None:
        """SIGKILL of the node's Erlang VM: its peers get no goodbye, as when a machine dies."""
        self._script("kill", node, timeout=30)

    def restart(self, *nodes: str) -> None:
        """Start killed nodes again on their data, all at once (a killed node waits for its peers' tables
        when it boots, so nodes that all went down must come back together); returns once the cluster is whole."""
        self._script("start-node", *nodes, timeout=180)

    def heal(self) -> list[str]:
        """Restart every node that does not answer, so that one test's kill does not become the next test's
        outage; returns their names."""
        answering = self.answering()
        down = [name for name in self.names if name not in answering]
        if down:
            self.restart(*down)
        return down

    def answering(self) -> list[str]:
        """The nodes whose AMQP port accepts a connection now."""
        return [name for name, port in zip(self.names, self.ports, strict=True) if _answers(port)]

    def rabbitmqctl_any(self, *args: str) -> str:
        """`rabbitmqctl ARGS` on the first node that does it: for what the whole cluster answers alike."""
        return self._any_node(None, *args)

    def running_nodes(self, node: str | None = None) -> list[str]:
        """The running nodes as `node` sees them (default: the first node that answers), sorted."""
        status: dict[str, Any] = json.loads(self._any_node(node, "cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    def queue_info(
        self, queue: str, vhost: str = "/", keys: Sequence[str] = ("leader", "members", "online")
    ) -> dict[str, Any]:
        """`list_queues` columns of one queue, asked of the first node that answers (the queue's own leader
        may be the node a test just killed)."""
        rows: list[dict[str, Any]] = json.loads(
            self._any_node(None, "list_queues", "-p", vhost, "name", *keys, "--formatter", "json")
        )
        for row in rows:
            if row["name"] == queue:
                return row
        raise LookupError(f"no queue {queue!r} in vhost {vhost!r}")

    def leader_of(self, queue: str, vhost: str = "/") -> str:
        """The node of the quorum queue's leader as the cluster's metadata has it: a moment behind an election."""
        leader: str = self.queue_info(queue, vhost, ("leader",))["leader"]
        return leader

    @contextmanager
    def scratch_vhost(self, prefix: str) -> Iterator[str]:
        """A fresh vhost guest may do anything on, deleted afterwards; yields its URLs joined by ';'."""
        vhost = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self._any_node(None, "add_vhost", vhost)
        try:
            self._any_node(None, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            yield self.urls(vhost)
        finally:
            self._any_node(None, "delete_vhost", vhost)

    def _any_node(self, node: str | None, *args: str) -> str:
        """rabbitmqctl on `node`, or else on the answering nodes in turn until one of them does it."""
        if node is not None:
            return self.rabbitmqctl(node, *args)
        error = ClusterError("no node of the cluster answers")
        for name in self.answering():
            try:
                return self.rabbitmqctl(name, *args)
            except ClusterError as failed:
                error = failed
        raise error

    def _script(self, *args: str, timeout: float) -> str:
        try:
            done = subprocess.run(
                ["bash", str(SCRIPT), *args], env=self._env, check=True, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.CalledProcessError as failed:
            raise ClusterError(f"scripts/cluster.sh {' '.join(args)}: {failed.stderr.strip()}") from failed
        return done.stdout


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True

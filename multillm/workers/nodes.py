"""Which broker node a worker connects to: the nodes of a cluster, spread over and failed over.

`broker_url` lists one node or the nodes of one cluster (`urls.broker_nodes`). A worker
tries them in turn, starting where `broker_failover` says: at a random node ("shuffle",
the default, so that a fleet of workers spreads its connections over the cluster), or at
the first ("round-robin", for an operator who lists the nearest node first). A node that
refuses costs one failed connect and the next is tried at once; only when every node has
failed does the worker wait before the next round. Once connected, a worker stays on its
node until that connection is lost; the next round then starts at another node, chosen at
random again ("shuffle": the workers of a node that died spread over the others) or the
one after it ("round-robin"), and tries the node it was on last.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pika

from multillm.config import Failover
from multillm.errors import ConfigError
from multillm.urls import broker_nodes, mask_url


class BrokerNodes:
    """The nodes of `broker_url` and the order to try them in; on the event loop only."""

    def __init__(
        self,
        broker_url: str,
        failover: Failover = "shuffle",
        rng: random.Random | None = None,
        *,
        connection_name: str | None = None,
    ) -> None:
        """`connection_name`: what the broker lists the connection as (its `user_provided_name`).

        Raises:
            ConfigError: `broker_url` is malformed (the message names the entry).
        """
        urls = broker_nodes(broker_url)
        self._parameters = [_parameters(url, position, len(urls)) for position, url in enumerate(urls, 1)]
        if connection_name is not None:
            for params in self._parameters:  # pika adds these to its own client properties
                params.client_properties = {"connection_name": connection_name}
        # host:port names a node in the logs: it identifies the node and holds no password.
        self.names = [f"{params.host}:{params.port}" for params in self._parameters]
        self._rng = rng or random.Random()
        self._shuffle = failover == "shuffle"
        self._next = self._rng.randrange(len(urls)) if self._shuffle else 0
        self._current: int | None = None

    def __len__(self) -> int:
        return len(self._parameters)

    def attempts(self) -> Iterator[tuple[str, pika.URLParameters]]:
        """Each node once, as (name, connection parameters), in the order to try them now.

        Call `connected(name)` with the node that answered.
        """
        count = len(self._parameters)
        order = [(self._next + step) % count for step in range(count)]
        if self._current is not None:  # the node it was on, which may have just died: last
            order.remove(self._current)
            order.append(self._current)
        for index in order:
            yield self.names[index], self._parameters[index]

    def connected(self, name: str) -> None:
        """`name` answered: the next round, after this connection is lost, starts at another node."""
        index = self.names.index(name)
        self._current = index
        others = len(self._parameters) - 1
        step = 1 + self._rng.randrange(others) if self._shuffle and others else 1
        self._next = (index + step) % len(self._parameters)

    @property
    def current(self) -> str | None:
        """The node of the connection now open (or last open)."""
        return None if self._current is None else self.names[self._current]


def _parameters(url: str, position: int, count: int) -> pika.URLParameters:
    try:
        return pika.URLParameters(url)
    except ValueError as exc:  # pika's checks of the query (`?heartbeat=x`, an unknown option)
        where = f"entry {position} of {count}" if count > 1 else "the broker URL"
        raise ConfigError(f"{where} ({mask_url(url)!r}): {mask_url(str(exc))}") from None

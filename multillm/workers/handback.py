"""Handing settlements from the pool threads back to the connection's thread, in batches.

`add_callback_threadsafe` wakes the connection's thread through a socket, one
system call and one wake-up per call. Under load many calls end while that
thread is busy, so a pool thread queues its settlement and asks for a wake-up
only when none is pending: one wake-up settles everything that finished meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pika
import pika.exceptions
import structlog

from multillm.workers.messages import Delivery, Settlement

log = structlog.get_logger(__name__)


class Handback:
    """A queue of finished work, drained on the connection's thread.

    Args:
        settle: called on the connection's thread for each queued settlement, in order.
    """

    def __init__(self, settle: Callable[[Delivery, Settlement], None]) -> None:
        self._settle = settle
        self._lock = threading.Lock()
        self._ready: list[tuple[Delivery, Settlement]] = []
        self._connection: pika.BlockingConnection | None = None
        self._wake_pending = False

    def attach(self, connection: pika.BlockingConnection | None) -> None:
        """Drain on `connection` from now on (None: no connection). Call on the connection's thread.

        What was queued for an earlier connection is dropped: the broker redelivers those messages.
        """
        with self._lock:
            self._connection, self._ready, self._wake_pending = connection, [], False

    def put(self, delivery: Delivery, settlement: Settlement) -> None:
        """Queue a settlement; from any thread."""
        with self._lock:
            connection = self._connection
            if connection is None:
                log.warning("worker.settle_dropped", reason="connection closed; message will be redelivered")
                return
            self._ready.append((delivery, settlement))
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            connection.add_callback_threadsafe(self._drain)
        except pika.exceptions.ConnectionWrongStateError:
            log.warning("worker.settle_dropped", reason="connection closed; message will be redelivered")

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready, self._wake_pending = self._ready, [], False
        for delivery, settlement in ready:
            self._settle(delivery, settlement)

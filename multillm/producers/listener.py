"""The thread that reads a `Client`'s reply queue: replies and chunks, dispatched as they come, acked in groups."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Final

import kombu

from multillm.errors import BrokerUnavailable, describe
from multillm.logging_setup import get_logger
from multillm.producers.publishing import connect, drain
from multillm.producers.replies import Reply, dispatch
from multillm.schemas import V1ChatCompletionChunk
from multillm.urls import mask_url

log = get_logger(__name__)


# Replies the broker may have outstanding to the listener.
_REPLY_PREFETCH: Final = 64
# Replies acknowledged together (one basic.ack with `multiple`), and at each lull: an ack
# per reply cost the caller ~70 µs and the broker ~60 µs of CPU per reply (step 17 in
# docs/benchmarks.md). Half the prefetch, so that the broker is never kept waiting for one.
_ACK_EVERY: Final = _REPLY_PREFETCH // 2


class ReplyListener(threading.Thread):
    """Owns the reply connection; runs `on_reply` on its own thread for every reply."""

    def __init__(
        self,
        broker_url: str,
        queue: kombu.Queue,
        on_reply: Callable[[Reply], None],
        on_chunk: Callable[[str | None, V1ChatCompletionChunk], None],
    ) -> None:
        super().__init__(name="multillm-replies", daemon=True)
        self._broker_url = broker_url
        self._queue = queue
        self._on_reply = on_reply
        self._on_chunk = on_chunk
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        # The last reply dispatched and not yet acked, and how many are waiting with it.
        self._unacked: kombu.Message | None = None
        self._unacked_count = 0

    def wait_ready(self, broker_url: str, timeout: float) -> None:
        if not self._ready.wait(timeout):
            self.stop()
            cause = f": {self._error}" if self._error else ""
            raise BrokerUnavailable(f"no broker answered at {mask_url(broker_url)} within {timeout:g}s{cause}")

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                self._consume()
                return
            except Exception as exc:  # any broker failure: reconnect, the queue outlives it
                self._error = exc
                # Before the first connection, the constructor reports the failure itself.
                level = log.warning if self._ready.is_set() else log.debug
                level("reply_listener.reconnecting", error=describe(exc))
                self._stopping.wait(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 5.0)

    def _consume(self) -> None:
        # Replies left unacked on a lost connection are the broker's again; theirs are not ours to ack.
        self._unacked, self._unacked_count = None, 0
        with (
            connect(self._broker_url) as connection,
            kombu.Consumer(connection, [self._queue], on_message=self._on_message, prefetch_count=_REPLY_PREFETCH),
        ):
            self._ready.set()
            drain(connection, stop=self._stopping.is_set, on_idle=self._ack)
            self._ack()

    def _on_message(self, message: kombu.Message) -> None:
        props = message.properties
        try:
            dispatch(message, self._on_reply, self._on_chunk)
        except Exception:
            # A reply must never take the listener down with it: that would strand every other caller.
            log.exception("reply.dispatch_failed", correlation_id=props.get("correlation_id"))
        # Acked after dispatch: a listener that dies mid-way leaves the reply in the queue, and
        # the new listener drops the copy whose call already has its answer (`reply.unmatched`).
        self._unacked = message
        self._unacked_count += 1
        if self._unacked_count >= _ACK_EVERY:
            self._ack()

    def _ack(self) -> None:
        """Acknowledge every reply dispatched so far, with one frame."""
        if self._unacked is not None:
            message, self._unacked, self._unacked_count = self._unacked, None, 0
            message.ack(multiple=True)

"""The primary's answer as it is written: chunk messages to the caller's reply queue.

A request with header `x-multillm-stream` gets, before its final reply, `V1ChatCompletionChunk`
messages on its `reply_to`. `ChunkStream` is the providers' `StreamListener` for that call:

- each try of the call (`started`: the first, a retry) is a stream of its own, a new
  `streamId` from `seq` 0, so that a caller drops what an abandoned try sent;
- the first delta of a try goes out at once: the caller's time to first token is the model's
  plus one hop through the broker;
- later deltas are coalesced, so that a fast model does not cost one AMQP message per token:
  a chunk goes out once the oldest delta it holds is `flush_ms` old, or once it holds
  `flush_bytes` of text (`[stream]` in multillm.toml);
- `close` sends what is left, before the final reply, which the consumer publishes on the
  same channel: the caller gets every chunk before the reply.

Chunks are transient, not mandatory, and nothing waits for their confirms: the final reply
carries the whole text, and it alone is confirmed before the request is acked. A redelivered
request streams again under a new `streamId`; one answered from its stored record sends no
chunks, only the reply.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence

import pika

from multillm import contract
from multillm.config import StreamConfig
from multillm.metrics import Published
from multillm.schemas import V1ChatCompletionChunk, encode
from multillm.workers.messages import Outgoing

# AMQP delivery mode of a chunk: transient; the final reply is the persistent copy of the text.
_TRANSIENT = 1


class ChunkStream:
    """Sends one request's streamed answer to `reply_to` as chunks; on the worker's event loop.

    Args:
        send: publishes messages on the delivery's connection, with nothing waiting (`Running.send`).
        reply_to: the caller's reply queue (a direct reply-to name too).
        correlation_id: the request's, as its final reply carries it.
        log_id: the primary's record, the `id` of every chunk.
        config: the coalescing bounds.
    """

    def __init__(
        self,
        send: Callable[[Sequence[Outgoing]], None],
        reply_to: str,
        correlation_id: str,
        log_id: str,
        config: StreamConfig,
    ) -> None:
        self._send = send
        self._reply_to = reply_to
        self._correlation_id = correlation_id
        self._log_id = log_id
        self._delay = config.flush_ms / 1000
        self._max_bytes = config.flush_bytes
        self._stream_id = ""
        self._seq = 0
        self._held: list[str] = []
        self._held_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self.chunks_sent = 0

    def started(self) -> None:
        """A try begins: a new stream; what the last one held is void."""
        self._cancel_timer()
        self._stream_id = uuid.uuid4().hex
        self._seq = 0
        self._held.clear()
        self._held_bytes = 0

    def delta(self, text: str) -> None:
        if not text:
            return
        self._held.append(text)
        # Counted in characters, not encoded: a bound, and what a caller cares about is the size.
        self._held_bytes += len(text)
        if self._seq == 0 or self._held_bytes >= self._max_bytes:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self.flush)

    def flush(self) -> None:
        """Send what is held as one chunk, now."""
        self._cancel_timer()
        if not self._held:
            return
        chunk = V1ChatCompletionChunk(
            id=self._log_id, stream_id=self._stream_id, seq=self._seq, delta="".join(self._held)
        )
        self._seq += 1
        self._held.clear()
        self._held_bytes = 0
        self.chunks_sent += 1
        self._send([self._message(chunk)])

    def close(self) -> None:
        """The call is over: send what is left, before the final reply."""
        self.flush()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _message(self, chunk: V1ChatCompletionChunk) -> Outgoing:
        return Outgoing(
            exchange="",
            routing_key=self._reply_to,
            body=encode(chunk),
            properties=pika.BasicProperties(
                content_type=contract.CONTENT_TYPE,
                delivery_mode=_TRANSIENT,
                correlation_id=self._correlation_id,
                type=contract.TYPE_CHUNK,
            ),
            kind=Published.CHUNK,
            mandatory=False,
        )

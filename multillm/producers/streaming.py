"""Reading a streamed answer: the chunks of every try, and the final reply, as text to show.

A request published with `stream=True` gets `V1ChatCompletionChunk` messages before its final
reply. Each try at the answer (a worker's retry, a redelivery to another worker) is a stream of
its own (`streamId`, `seq` from 0), and a new try starts over. `StreamText` turns what arrives
into `StreamDelta`s such that the text shown is never shown twice:

- a chunk of a stream that was given up (an older `streamId`) is dropped;
- a new try whose text repeats what is shown stays silent until it goes beyond it;
- a new try whose text differs replaces what is shown: a delta with `restart`;
- the final reply's text settles it: what is missing is added, or a `restart` delta replaces
  the text when a try's chunks were lost or the reply came from a stored record.

So the deltas since the last `restart`, joined, are the text shown, and at the end they equal
the final reply's text. `ReplyStream` (threads) and `AsyncReplyStream` (asyncio) iterate them
for `Client.stream` and `AsyncClient.stream`; a named queue's consumer uses `StreamText` itself.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator

from msgspec import Struct

from multillm.errors import RequestTimeout
from multillm.producers.replies import Reply
from multillm.schemas import V1ChatCompletionChunk, V1MultiLLMChatCompletion


class StreamDelta(Struct, frozen=True):
    """Text to show next. `restart`: first clear what was shown; `text` is the start of a new try."""

    text: str
    restart: bool = False


class StreamText:
    """The text of one request's streamed answer as a caller shows it; see the module docstring."""

    def __init__(self) -> None:
        self.shown = ""
        self._stream_id: str | None = None
        self._given_up: set[str] = set()
        self._next_seq = 0
        self._try_text = ""
        self._gap = False

    def add(self, chunk: V1ChatCompletionChunk) -> list[StreamDelta]:
        """What to show after `chunk` (often one delta; none for a chunk of a given-up try)."""
        if chunk.stream_id in self._given_up:
            return []
        if chunk.stream_id != self._stream_id:
            if self._stream_id is not None:
                self._given_up.add(self._stream_id)
            self._stream_id, self._next_seq, self._try_text, self._gap = chunk.stream_id, 0, "", False
        if chunk.seq < self._next_seq:
            return []  # a copy of one already added (at-least-once)
        if chunk.seq > self._next_seq or self._gap:
            # One went missing: this try's text is unknown from here; the final reply fills it in.
            self._gap = True
            return []
        self._next_seq += 1
        self._try_text += chunk.delta
        return self._show(self._try_text)

    def finish(self, text: str) -> list[StreamDelta]:
        """What to show once the final reply's `text` is in: at most one delta."""
        return self._show(text)

    def _show(self, text: str) -> list[StreamDelta]:
        """Make the text shown `text`, or a prefix of it while a new try catches up."""
        if text.startswith(self.shown):
            new, self.shown = text[len(self.shown) :], text
            return [StreamDelta(new)] if new else []
        if self.shown.startswith(text):
            return []  # a new try repeating what is shown: nothing new yet
        self.shown = text
        return [StreamDelta(text, restart=True)]


# What the reply listener hands a stream: a chunk, the final reply, or why the stream ended.
Item = V1ChatCompletionChunk | Reply | BaseException


class _Stream:
    """What the two iterators share: the request, its deadline, and how each item is taken."""

    def __init__(self, request_id: str, timeout: float, forget: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.text = StreamText()
        # The final reply, once the iteration has ended with it.
        self.reply: V1MultiLLMChatCompletion | None = None
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._forget = forget

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout(f"no reply to request {self.request_id} within {self._timeout:g}s")
        return remaining

    def _take(self, item: Item) -> list[StreamDelta]:
        """The deltas `item` brings; sets `reply` at the end. Raises the typed error of an error reply,
        or why the stream ended otherwise (the client was closed)."""
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Reply):
            reply = item.result()
            deltas = self.text.finish(reply.text)
            self.reply = reply
            return deltas
        return self.text.add(item)

    def close(self) -> None:
        """Stop listening for this request (at the end of the iteration, or when the caller leaves it early)."""
        self._forget(self.request_id)


class ReplyStream(_Stream):
    """`Client.stream`'s answer: iterate it for `StreamDelta`s; then `reply` is the final reply.

    The iteration raises what `Client.create` raises, after the deltas that came before: the typed
    `RpcError` of an error reply, `RequestTimeout` when the reply is not in within the timeout.
    Iterate it once, from one thread.
    """

    def __init__(self, request_id: str, timeout: float, forget: Callable[[str], None]) -> None:
        super().__init__(request_id, timeout, forget)
        self._items: queue.SimpleQueue[Item] = queue.SimpleQueue()

    def put(self, item: Item) -> None:
        """From the reply listener's thread."""
        self._items.put(item)

    def __iter__(self) -> Iterator[StreamDelta]:
        try:
            while self.reply is None:
                try:
                    item = self._items.get(timeout=self._remaining())
                except queue.Empty:
                    continue  # `_remaining` raises the timeout
                yield from self._take(item)
        finally:
            self.close()


class AsyncReplyStream(_Stream):
    """`AsyncClient.stream`'s answer: `async for` it as `ReplyStream`; on the caller's event loop."""

    def __init__(self, request_id: str, timeout: float, forget: Callable[[str], None]) -> None:
        super().__init__(request_id, timeout, forget)
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[Item] = asyncio.Queue()

    def put(self, item: Item) -> None:
        """From the reply listener's thread: handed to the caller's loop."""
        self._loop.call_soon_threadsafe(self._items.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[StreamDelta]:
        try:
            while self.reply is None:
                try:
                    item = await asyncio.wait_for(self._items.get(), self._remaining())
                except TimeoutError:
                    continue
                for delta in self._take(item):
                    yield delta
        finally:
            self.close()


__all__ = ["AsyncReplyStream", "ReplyStream", "StreamDelta", "StreamText"]

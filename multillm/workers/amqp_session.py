"""One pika connection and channel on the running asyncio loop, with awaitable RPCs.

pika's `AsyncioConnection` answers every method by callback. `AmqpSession` turns
those callbacks into awaitables, and fails every await still pending the moment
the connection or the channel closes, with the reason pika gives: no coroutine
waits for an answer that will never come.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pika
import pika.channel
import pika.connection
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection


class CoalescingConnection(AsyncioConnection):  # type: ignore[misc]  # pika has no type hints
    """pika's `AsyncioConnection`, writing the frames of each turn of the loop as one write.

    pika hands its transport every frame on its own (a publish is three, an ack one), and the
    transport sends each with a `send` of its own. A reply, the record for the stream and an ack
    were seven system calls on the loopback, each waking the broker: the largest item of a
    worker's own CPU in a burst (docs/benchmarks.md, "Seen from outside"). Here the frames of
    one turn are joined and reach the transport early in the next turn, in the order pika
    made them. The transport sends them once the loop next finds the socket writable: one turn
    later than pika alone. The benchmark saw no cost in that, and sending at once would take
    calling a private method of pika's transport (docs/benchmarks.md, "Seen from outside").
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before pika's own __init__, which sets the connection going: whatever it writes finds the list.
        self._frames: list[bytes] = []
        super().__init__(*args, **kwargs)

    def _adapter_emit_data(self, data: bytes) -> None:
        if not self._frames:
            self.ioloop.call_soon(self._flush_frames)
        self._frames.append(data)

    def _flush_frames(self) -> None:
        frames, self._frames = self._frames, []
        if self._transport is not None:  # gone with the connection: so is what it would have sent
            super()._adapter_emit_data(b"".join(frames))


class AmqpSession:
    """A connection and its one channel; build it with `await AmqpSession.open(parameters)`."""

    def __init__(self, connection: CoalescingConnection) -> None:
        self.connection = connection
        self.channel: pika.channel.Channel | None = None
        loop = asyncio.get_running_loop()
        # Why the session ended (the first reason wins); done once the connection or channel is gone.
        self.gone: asyncio.Future[BaseException] = loop.create_future()
        # Done once the connection is closed for good (after a `close`, or when the broker went away).
        self.closed: asyncio.Future[None] = loop.create_future()
        self._pending: set[asyncio.Future[Any]] = set()

    @classmethod
    async def open(cls, parameters: pika.connection.Parameters) -> AmqpSession:
        """Connect and open a channel.

        Raises:
            pika.exceptions.AMQPError: the broker refused or could not be reached.
        """
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        # The callbacks below run only once the loop turns, by when `session` is bound.

        def on_open(connection: pika.connection.Connection) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(connection: pika.connection.Connection, error: BaseException | str) -> None:
            failure = error if isinstance(error, BaseException) else pika.exceptions.AMQPConnectionError(error)
            if not opened.done():
                opened.set_exception(failure)
            session.lose(failure, closed=True)

        def on_close(connection: pika.connection.Connection, reason: BaseException) -> None:
            if not opened.done():
                opened.set_exception(reason)
            session.lose(reason, closed=True)

        connection = CoalescingConnection(parameters, on_open, on_open_error, on_close, custom_ioloop=loop)
        session = cls(connection)
        await opened
        try:
            session.channel = await session._open_channel(lambda _channel, reason: session.lose(reason))
        except BaseException:
            await session.aclose()
            raise
        return session

    async def side_channel(
        self, on_close: Callable[[pika.channel.Channel, BaseException], None]
    ) -> pika.channel.Channel:
        """Another channel on this connection, whose closing ends only itself (`on_close` is told).

        Raises:
            the reason the session ended, when it ends first; the broker's, when it refuses the channel.
        """
        return await self._open_channel(on_close)

    async def _open_channel(
        self, on_close: Callable[[pika.channel.Channel, BaseException], None]
    ) -> pika.channel.Channel:
        opened, answered = self._answer()
        if self.gone.done():
            raise self.gone.result()
        channel = self.connection.channel(on_open_callback=answered)

        def closed(channel: pika.channel.Channel, reason: BaseException) -> None:
            # Before the channel is open: a broker that closes it while opening must fail the wait too.
            if not opened.done():
                opened.set_exception(reason)
            on_close(channel, reason)

        channel.add_on_close_callback(closed)
        await self._wait(opened)
        return channel

    async def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`method(*args, callback=..., **kwargs)`, awaited until pika calls back; returns what it passes.

        Raises:
            the reason the session ended, when it ends first.
        """
        future, answered = self._answer()
        if self.gone.done():
            raise self.gone.result()
        method(*args, callback=answered, **kwargs)
        return await self._wait(future)

    def _answer(self) -> tuple[asyncio.Future[Any], Callable[[Any], None]]:
        """A future, and the pika callback that resolves it with what pika passes."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def answered(result: Any) -> None:
            if not future.done():
                future.set_result(result)

        return future, answered

    def watch(self, future: asyncio.Future[Any]) -> None:
        """Fail `future` with the reason the session ended, should it end before `future` is done."""
        if self.gone.done():
            if not future.done():
                future.set_exception(self.gone.result())
            return
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def _wait(self, future: asyncio.Future[Any]) -> Any:
        self.watch(future)
        return await future

    def lose(self, reason: BaseException, *, closed: bool = False) -> None:
        """The session is over, for `reason`: fail what waits on it. `closed`: the connection is closed too."""
        if not self.gone.done():
            self.gone.set_result(reason)
        if closed and not self.closed.done():
            self.closed.set_result(None)
        for future in self._pending:
            if not future.done():
                future.set_exception(reason)

    @property
    def is_open(self) -> bool:
        """Both the connection and the channel are open, and nothing has ended the session."""
        channel = self.channel
        return not self.gone.done() and channel is not None and channel.is_open

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close the connection (the broker requeues what was not acked) and wait for it, up to `timeout`."""
        with contextlib.suppress(pika.exceptions.AMQPError):
            if not (self.connection.is_closed or self.connection.is_closing):
                self.connection.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)

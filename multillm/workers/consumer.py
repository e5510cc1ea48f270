"""The consumer loop shared by both workers: one thread, one asyncio event loop, one pika connection.

Everything a worker does with the broker and the models runs on one event loop:
pika's `AsyncioConnection` receives deliveries, publishes and acks, and each
delivery's work (the model call) runs as a task, at most `concurrency` at once.
With one thread there is no hand-over between a connection thread and call
threads: with a thread per call, 512 calls in flight spent a third of the
worker's CPU passing the GIL around (docs/benchmarks.md). What blocks, the sink's
writes, goes to a few sink threads (`sinks/group_commit.py`), not to the loop's default
executor, which pika and aiohttp need for name lookups.

A delivery is settled in exactly one place, `Consumer.settle`: publish what is
owed (confirmed, without waiting: `PipelinedConfirms`), then ack; or, when the
broker would not take what is owed, reject with requeue, which the queue's
delivery limit bounds.

Each connection has a generation number. A delivery remembers the generation it
came on; work or a settlement for an older generation is dropped, because the
broker has already put that message back for redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import pika
import pika.channel
import pika.exceptions
import structlog

from multillm import contract
from multillm.contract import QueueSpec
from multillm.errors import Code, ConfigError
from multillm.metrics import WorkerMetrics
from multillm.workers.amqp_session import AmqpSession
from multillm.workers.confirms import PipelinedConfirms
from multillm.workers.messages import Delivery, Handler, Outgoing, Settlement, dead_letter

log = structlog.get_logger(__name__)


# Twice the concurrency: a call slot that frees finds its next message here, instead of
# idling through an ack and a delivery (docs/benchmarks.md: +10-15% at latency 0).
PREFETCH_PER_CALL = 2


class _ChannelGone(Exception):
    """The broker cancelled our consumer, or settling failed unexpectedly: start over on a new connection."""


# Errors after which the connection (or channel) is gone and must be rebuilt.
_CONNECTION_ERRORS = (
    _ChannelGone,
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    ConnectionError,
    OSError,
)


class Consumer:
    """Runs each handler against its queue until SIGTERM/SIGINT; reconnects when the broker goes away.

    All the queues are consumed on the one channel and share the call slots; a delivery
    goes to the handler of the queue it came from.

    `serve()` runs on the event loop, where every method of this class runs (see the
    module docstring); only `stop` may be called from another thread.
    """

    def __init__(
        self,
        broker_url: str,
        handlers: Sequence[Handler],
        *,
        concurrency: int = 4,
        grace_seconds: float = 30.0,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._metrics = metrics or WorkerMetrics()
        self._params = pika.URLParameters(broker_url)
        self._handlers = {handler.queue.name: handler for handler in handlers}
        self._concurrency = concurrency
        self._grace = grace_seconds
        # Every work queue dead-letters to the triage queue: it must exist for them to.
        declared = [*(handler.queue for handler in handlers), contract.triage_queue(), contract.dead_queue()]
        self._declare = tuple({spec.name: spec for spec in declared}.values())
        # Deliveries past it (prefetch is twice the concurrency) wait here, in order.
        self._slots = asyncio.Semaphore(concurrency)
        self._session: AmqpSession | None = None
        self._confirms: PipelinedConfirms | None = None
        self._consumer_tags: list[str] = []
        self._generation = 0
        self._in_flight: set[int] = set()
        # Deliveries of this connection whose work waits for a call slot, by tag: on a stop
        # they go back to the queue at once, for another worker.
        self._not_begun: dict[int, Delivery] = {}
        # Tasks started and not finished, whatever connection they came on; the loop keeps
        # only weak references to tasks, so these keep them alive too.
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._stopping = asyncio.Event()
        self._signals = 0

    # --- life cycle ---------------------------------------------------------

    async def serve(self) -> int:
        """Consume until asked to stop; returns the process exit code. Never exits for a lost broker."""
        self._loop = asyncio.get_running_loop()
        if self._stop.is_set():
            self._stopping.set()
        self._install_signal_handlers()
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if not await self._connect_unless_stopped():
                    break
                backoff = 0.5
                await self._consume_until_stopped()
            except ConfigError:
                raise
            except Exception as exc:  # the broker went away, or a bug: reconnect either way
                event = "broker.connection_lost" if isinstance(exc, _CONNECTION_ERRORS) else "worker.loop_failed"
                log.warning(event, error=f"{type(exc).__name__}: {exc}", retry_in=backoff)
                # Close what is left of it: a half-dead connection would keep its deliveries unacked.
                await self._close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 15.0)
        await self._wait_for_running_calls()
        await self._close()
        abandoned = len(self._tasks)
        log.info("worker.stopped", queues=list(self._handlers), abandoned=abandoned)
        if abandoned:
            # Calls still running past the grace period are left (their messages are redelivered).
            # Exit without the interpreter's finalization, which a call still running could trip.
            sys.stderr.flush()
            os._exit(0)
        return 0

    def stop(self) -> None:
        """Ask the loop to stop taking messages and finish those in flight. Safe from any thread."""
        self._stop.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        assert self._loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            # A second signal means now: what was not acked is redelivered by the broker.
            log.warning("worker.killed", signal=signal.Signals(signum).name, unacked=len(self._in_flight))
            sys.stderr.flush()
            os._exit(1)
        log.info("worker.stopping", signal=signal.Signals(signum).name, in_flight=len(self._in_flight))
        self.stop()

    async def _unless_stopped(self, future: asyncio.Future[Any]) -> bool:
        """Wait for `future` or a stop, whichever comes first; True if `future` is done."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        either: set[asyncio.Future[Any]] = {future, stopping}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        return future.done()

    async def _connect_unless_stopped(self) -> bool:
        """Connect; False if a stop came first (a broker that does not answer must not hold up a SIGTERM)."""
        connecting = asyncio.ensure_future(self._connect())
        if await self._unless_stopped(connecting):
            connecting.result()  # raises what connecting raised
            return True
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        return False

    async def _connect(self) -> None:
        session = await AmqpSession.open(self._params)
        try:
            confirms = await PipelinedConfirms.start(session, session.lose, self._metrics.published)
            channel = session.channel
            assert channel is not None
            await session.call(channel.basic_qos, prefetch_count=PREFETCH_PER_CALL * self._concurrency)
            await declare(session, self._declare)
            # Bound to this session: a late callback of an old connection must not end a new one.
            channel.add_on_cancel_callback(
                lambda frame: session.lose(_ChannelGone("the broker cancelled the consumer"))
            )
        except BaseException as exc:
            await session.aclose()
            if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 406:
                # Retrying cannot help: a queue exists with other arguments than ours.
                raise ConfigError(
                    f"the broker refused our topology: {exc.reply_text}. Another program declared it with other "
                    "arguments; delete that queue or exchange (it is empty when drained) or align the arguments"
                ) from None
            raise
        self._generation += 1
        self._session, self._confirms, self._in_flight, self._not_begun = session, confirms, set(), {}
        self._consumer_tags = [
            channel.basic_consume(queue, partial(self._on_message, self._generation, handler))
            for queue, handler in self._handlers.items()
        ]
        log.info("worker.consuming", queues=list(self._handlers), concurrency=self._concurrency)

    def _lose(self, reason: BaseException) -> None:
        """Give up the current connection (the main coroutine reconnects)."""
        if self._session is not None:
            self._session.lose(reason)

    async def _consume_until_stopped(self) -> None:
        session = self._session
        assert session is not None and session.channel is not None
        if await self._unless_stopped(session.gone):
            raise session.gone.result()
        # Stop taking messages, and put back at once those prefetched and not begun.
        with contextlib.suppress(*_CONNECTION_ERRORS):
            for tag in self._consumer_tags:
                await asyncio.wait_for(session.call(session.channel.basic_cancel, tag), 5)
        not_begun, self._not_begun = list(self._not_begun.values()), {}
        for delivery in not_begun:
            self._settle_or_lose(delivery, Settlement(requeue=True))
        deadline = time.monotonic() + self._grace
        while self._in_flight and time.monotonic() < deadline and not session.gone.done():
            await asyncio.sleep(0.05)
        if self._in_flight:
            log.warning("worker.grace_expired", unacked=len(self._in_flight))

    async def _wait_for_running_calls(self) -> None:
        """After a stop while disconnected: give calls still running the rest of the grace period."""
        deadline = time.monotonic() + self._grace
        while self._session is None and self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def _close(self) -> None:
        session, self._session, self._confirms = self._session, None, None
        # Tasks still waiting for the closed connection are skipped, even while reconnecting.
        self._generation += 1
        self._in_flight, self._not_begun = set(), {}
        if session is not None:
            await session.aclose()

    # --- pika's callbacks ---------------------------------------------------

    def _on_message(
        self,
        generation: int,
        handler: Handler,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        delivery = Delivery(method.delivery_tag, props, body, method.redelivered, generation, handler.queue.name)
        if not self._current(delivery):
            return  # it arrived as the session ended: the broker redelivers it
        self._in_flight.add(delivery.tag)
        give_up = delivery.delivery_count >= contract.GIVE_UP_AT_DELIVERY_COUNT
        self._metrics.consumed(delivery.queue, delivery.redelivered, give_up)
        try:
            if give_up:
                log.error(
                    "message.given_up",
                    queue=delivery.queue,
                    deliveries=delivery.delivery_count + 1,
                    message_id=props.message_id,
                )
                handler.on_give_up(delivery, self)
            else:
                handler.on_delivery(delivery, self)
        except _CONNECTION_ERRORS as exc:
            self._lose(exc)
        except Exception as exc:
            log.exception("worker.handler_failed", queue=delivery.queue, message_id=props.message_id)
            self._settle_or_lose(delivery, handler.on_error(delivery, exc))

    def _settle_or_lose(self, delivery: Delivery, settlement: Settlement) -> None:
        try:
            self.settle(delivery, settlement)
        except _CONNECTION_ERRORS as exc:
            self._lose(exc)
        except Exception as exc:  # a bug: its delivery would stay unacked; the broker redelivers it
            log.exception("settle.failed", queue=delivery.queue)
            self._lose(_ChannelGone(f"settling failed: {type(exc).__name__}"))

    def publish(self, messages: Sequence[Outgoing]) -> asyncio.Future[list[bool]]:
        """See `Io.publish`."""
        assert self._session is not None and self._loop is not None
        taken: asyncio.Future[list[bool]] = self._loop.create_future()
        # Retrieved here as well: work that never began (requeued on a stop) leaves nobody to await it.
        taken.add_done_callback(_retrieve)
        self._session.watch(taken)
        try:
            self._publish_all(messages, partial(_resolve, taken))
        except BaseException:
            taken.cancel()
            raise
        return taken

    def _publish_all(self, messages: Sequence[Outgoing], then: Callable[[list[bool]], None]) -> None:
        assert self._confirms is not None
        self._confirms.publish_all(messages, then)

    def settle(self, delivery: Delivery, settlement: Settlement) -> None:
        if not self._current(delivery):
            return
        if settlement.requeue:
            self._finish(delivery, [False])
            return
        try:
            self._publish_all(settlement.publishes, partial(self._after_publish, delivery, settlement.publishes))
        except _CONNECTION_ERRORS:
            raise
        except Exception:
            # Something it owes cannot even be encoded: a retry would fail the same way.
            log.exception("settle.failed", queue=delivery.queue)
            self._publish_all([self._last_resort(delivery)], partial(self._finish, delivery))

    def _current(self, delivery: Delivery) -> bool:
        session = self._session
        if session is None or delivery.generation != self._generation or not session.is_open:
            # The connection it came on is gone: the broker redelivers it, and the
            # sink's idempotent write keeps the record single.
            log.warning("worker.settle_dropped", reason="connection closed; message will be redelivered")
            return False
        return True

    def _after_publish(self, delivery: Delivery, published: Sequence[Outgoing], taken: list[bool]) -> None:
        """What a delivery owed is confirmed; a reply no queue took goes to the dead letters instead."""
        refused = [m for m, ok in zip(published, taken, strict=True) if not ok]
        for message in refused:
            if message.dead_letter_reason:
                log.warning("reply.unroutable", reply_to=message.routing_key, request_id=message.properties.message_id)
            else:
                log.error("settle.publish_refused", exchange=message.exchange, routing_key=message.routing_key)
        if any(not m.dead_letter_reason for m in refused):
            self._finish(delivery, [False])
            return
        dead = [
            dead_letter(
                delivery,
                delivery.queue,
                f"{m.dead_letter_reason}: no queue named {m.routing_key!r} took it",
                Code.NOT_FOUND,
                m.body,
                m.properties.type,
            )
            for m in refused
        ]
        if dead and self._current(delivery):
            self._publish_all(dead, partial(self._finish, delivery))
        else:
            self._finish(delivery, [True])

    def _finish(self, delivery: Delivery, taken: list[bool]) -> None:
        """Ack when everything owed was taken; otherwise requeue (the delivery limit bounds how often)."""
        if not self._current(delivery):
            return
        assert self._confirms is not None
        if all(taken):
            self._confirms.ack(delivery.tag)
        else:
            self._confirms.requeue(delivery.tag)
        self._in_flight.discard(delivery.tag)

    def _last_resort(self, delivery: Delivery) -> Outgoing:
        """A dead letter with nothing of the original but its masked body."""
        reason = "could not settle this message (see the worker's log)"
        return dead_letter(delivery, delivery.queue, reason, Code.INTERNAL, bare=True)

    def submit(self, delivery: Delivery, work: Callable[[], Awaitable[Settlement]]) -> None:
        if not self._current(delivery):
            return  # the broker redelivers it: calling the model now would be paid twice
        assert self._loop is not None
        self._not_begun[delivery.tag] = delivery
        task = self._loop.create_task(self._run_work(delivery, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_work(self, delivery: Delivery, work: Callable[[], Awaitable[Settlement]]) -> None:
        async with self._slots:
            if delivery.generation != self._generation or self._not_begun.pop(delivery.tag, None) is None:
                # Queued behind a call while the connection was lost (the broker has already put
                # it back), or put back when the worker began to stop: calling the model now
                # would be paid twice.
                return
            if self._stop.is_set():
                # Came in while the consumer was being cancelled: back to the queue, not begun.
                self._settle_or_lose(delivery, Settlement(requeue=True))
                return
            try:
                settlement = await work()
            except Exception as exc:
                if isinstance(exc, _CONNECTION_ERRORS) and not self._current(delivery):
                    return  # a publish it awaited failed with its connection: the broker redelivers it
                log.exception("worker.task_failed", queue=delivery.queue, message_id=delivery.properties.message_id)
                try:
                    settlement = self._handlers[delivery.queue].on_error(delivery, exc)
                except Exception as error:
                    settlement = Settlement([self._last_resort(delivery)])
                    log.exception("worker.on_error_failed", error=type(error).__name__)
            self._settle_or_lose(delivery, settlement)


def _resolve(future: asyncio.Future[list[bool]], taken: list[bool]) -> None:
    if not future.done():  # the session may have failed it first
        future.set_result(taken)


def _retrieve(future: asyncio.Future[list[bool]]) -> None:
    if not future.cancelled():
        future.exception()


async def declare(session: AmqpSession, queues: tuple[QueueSpec, ...]) -> None:
    """Declare every exchange, then these queues and their bindings, and remove the obsolete bindings
    of these queues; idempotent, so every start may."""
    channel = session.channel
    assert channel is not None
    for exchange, kind in contract.EXCHANGES.items():
        await session.call(channel.exchange_declare, exchange, exchange_type=kind, durable=True)
    for spec in queues:
        await session.call(channel.queue_declare, spec.name, durable=True, arguments=spec.arguments)
        if spec.exchange:
            await session.call(channel.queue_bind, spec.name, spec.exchange, routing_key=spec.routing_key)
    declared = {spec.name for spec in queues}
    for queue, exchange, routing_key in contract.OBSOLETE_BINDINGS:
        if queue in declared:
            await session.call(channel.queue_unbind, queue, exchange, routing_key=routing_key)

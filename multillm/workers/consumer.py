"""The consumer loop shared by both workers: one pika connection, one thread, a bounded pool.

Threading rule (as in pika's threaded consumer example and dramatiq's RabbitMQ
consumer): the thread that calls `Consumer.run` owns the connection and is the
only one that touches a pika object: it receives deliveries, publishes, acks.
Model calls and sink writes run on a fixed pool of `concurrency` threads; a pool
thread hands its `Settlement` back with `add_callback_threadsafe`, so the
connection's thread never blocks on a model and heartbeats keep flowing.

A delivery is settled in exactly one place, `Consumer._settle`: publish what is
owed (confirmed), then ack; or, when the work must be tried again, reject with
requeue, which the queue's delivery limit bounds.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Protocol

import pika
import pika.exceptions
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from multillm import contract
from multillm.contract import QueueSpec
from multillm.errors import Code, ConfigError

log = structlog.get_logger(__name__)

# Errors after which the connection (or channel) is gone and must be rebuilt.
_CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    ConnectionError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as received. `channel` identifies where it must be acked; handlers never use it."""

    tag: int
    properties: pika.BasicProperties
    body: bytes
    redelivered: bool
    channel: BlockingChannel

    @property
    def delivery_count(self) -> int:
        """How many times it was delivered before (quorum queues count; 0 the first time)."""
        count = (self.properties.headers or {}).get(contract.HEADER_DELIVERY_COUNT, 0)
        return int(count) if isinstance(count, int) else 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish with a confirm. `mandatory` makes an unroutable publish an error."""

    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    # A reply whose queue is gone is dead-lettered with this reason instead of being dropped.
    dead_letter_reason: str | None = None


@dataclass(slots=True)
class Settlement:
    """What a delivery owes before it is acked: messages to publish, or a retry."""

    publishes: list[Outgoing] = field(default_factory=list)
    requeue: bool = False


class Io(Protocol):
    """What a handler may ask of the connection's thread, from the connection's thread."""

    def publish(self, message: Outgoing) -> bool:
        """Publish with a confirm; False if no queue took it."""
        ...

    def settle(self, delivery: Delivery, settlement: Settlement) -> None: ...

    def submit(self, delivery: Delivery, work: Callable[[], Settlement]) -> None:
        """Run `work` on the pool; its Settlement comes back to this thread."""
        ...


class Handler(Protocol):
    """A worker's part of a message's life; the consumer loop does the rest."""

    queue: QueueSpec

    def on_delivery(self, delivery: Delivery, io: Io) -> None:
        """Called on the connection's thread; must not block on anything but the broker."""
        ...

    def on_error(self, delivery: Delivery, error: Exception) -> Settlement:
        """What is owed when handling failed unexpectedly (a bug): never a silent drop."""
        ...

    def on_give_up(self, delivery: Delivery, io: Io) -> None:
        """The message was delivered too often (it keeps failing or killing workers):
        settle it for good, with its reply or record and a dead letter."""
        ...


def dead_letter(
    delivery: Delivery,
    queue: str,
    reason: str,
    code: int,
    body: bytes | None = None,
    message_type: str | None = None,
) -> Outgoing:
    """A copy of a message (or `body` instead) for `multillm.dead`, with why it is there in headers."""
    props = delivery.properties
    headers = dict(props.headers or {})
    headers.update(
        {
            contract.HEADER_ERROR: reason[:1000],
            contract.HEADER_ERROR_CODE: code,
            contract.HEADER_SOURCE_QUEUE: queue,
        }
    )
    return Outgoing(
        exchange=contract.DEAD_EXCHANGE,
        routing_key="",
        body=delivery.body if body is None else body,
        properties=pika.BasicProperties(
            content_type=props.content_type,
            delivery_mode=contract.PERSISTENT,
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            type=message_type or props.type,
            headers=headers,
        ),
    )


class Consumer:
    """Runs one handler against one queue until SIGTERM/SIGINT; reconnects when the broker goes away.

    Threads: `run()`'s thread owns the pika connection (see the module docstring);
    the pool's threads run `work` callables and touch no pika object.
    """

    def __init__(
        self,
        broker_url: str,
        handler: Handler,
        *,
        concurrency: int = 4,
        grace_seconds: float = 30.0,
    ) -> None:
        self._params = pika.URLParameters(broker_url)
        self._handler = handler
        self._concurrency = concurrency
        self._grace = grace_seconds
        self._declare = (handler.queue, contract.dead_queue())
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model-call")
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._in_flight: set[int] = set()
        self._stop = threading.Event()
        self._signals = 0

    # --- life cycle ---------------------------------------------------------

    def run(self) -> int:
        """Consume until asked to stop; returns the process exit code."""
        self._install_signal_handlers()
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._connect()
                backoff = 0.5
                self._consume_until_stopped()
            except _CONNECTION_ERRORS as exc:
                log.warning("broker.connection_lost", error=f"{type(exc).__name__}: {exc}", retry_in=backoff)
                # Close what is left of it: a half-dead connection would keep its deliveries unacked.
                self._close()
                self._stop.wait(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 15.0)
        abandoned = len(self._in_flight)
        self._close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("worker.stopped", queue=self._handler.queue.name, abandoned=abandoned)
        if abandoned:
            # Calls still running past the grace period would hold the process open
            # (pool threads are not daemons); their messages are redelivered.
            sys.stderr.flush()
            os._exit(0)
        return 0

    def stop(self) -> None:
        """Ask the loop to stop taking messages and finish those in flight. Safe from any thread."""
        self._stop.set()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # A second signal means now: what was not acked is redelivered by the broker.
            log.warning("worker.killed", signal=signal.Signals(signum).name, unacked=len(self._in_flight))
            os._exit(1)
        log.info("worker.stopping", signal=signal.Signals(signum).name, in_flight=len(self._in_flight))
        self._stop.set()

    def _connect(self) -> None:
        connection = pika.BlockingConnection(self._params)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self._concurrency)
            declare(channel, self._declare)
        except BaseException as exc:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                connection.close()
            if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 406:
                # Retrying cannot help: a queue exists with other arguments than ours.
                raise ConfigError(
                    f"the broker refused our topology: {exc.reply_text}. Another program declared it with other "
                    "arguments; delete that queue or exchange (it is empty when drained) or align the arguments"
                ) from None
            raise
        self._connection, self._channel, self._in_flight = connection, channel, set()
        self._consumer_tag = channel.basic_consume(self._handler.queue.name, self._on_message)
        log.info("worker.consuming", queue=self._handler.queue.name, concurrency=self._concurrency)

    def _consume_until_stopped(self) -> None:
        assert self._connection is not None and self._channel is not None
        while not self._stop.is_set():
            self._connection.process_data_events(time_limit=0.2)
        # Stop taking messages; pika nacks (requeues) those received but not yet dispatched.
        self._channel.basic_cancel(self._consumer_tag)
        deadline = time.monotonic() + self._grace
        while self._in_flight and time.monotonic() < deadline:
            self._connection.process_data_events(time_limit=0.1)
        if self._in_flight:
            log.warning("worker.grace_expired", unacked=len(self._in_flight))

    def _close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                self._connection.close()
        self._forget_connection()

    def _forget_connection(self) -> None:
        self._connection = self._channel = None
        self._in_flight = set()

    # --- the connection's thread ------------------------------------------

    def _on_message(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        delivery = Delivery(method.delivery_tag, props, body, method.redelivered, channel)
        self._in_flight.add(delivery.tag)
        try:
            if delivery.delivery_count >= contract.GIVE_UP_AT_DELIVERY_COUNT:
                log.error("message.given_up", queue=self._handler.queue.name, deliveries=delivery.delivery_count + 1)
                self._handler.on_give_up(delivery, self)
            else:
                self._handler.on_delivery(delivery, self)
        except _CONNECTION_ERRORS:
            raise
        except Exception as exc:
            log.exception("worker.handler_failed", queue=self._handler.queue.name)
            self.settle(delivery, self._handler.on_error(delivery, exc))

    def publish(self, message: Outgoing) -> bool:
        assert self._channel is not None
        try:
            self._channel.basic_publish(
                message.exchange, message.routing_key, message.body, message.properties, mandatory=True
            )
        except pika.exceptions.UnroutableError:
            return False
        except pika.exceptions.NackError:
            # The broker refused it (e.g. a full queue with reject-publish): not taken, like unroutable.
            log.warning("publish.refused", exchange=message.exchange, routing_key=message.routing_key)
            return False
        return True

    def settle(self, delivery: Delivery, settlement: Settlement) -> None:
        channel = delivery.channel
        if self._channel is None or channel is not self._channel or not channel.is_open:
            # The channel it came on is gone: the broker redelivers it, and the
            # sink's idempotent write keeps the record single.
            log.warning("worker.settle_dropped", reason="channel closed; message will be redelivered")
            return
        if settlement.requeue or not all(self._deliver(delivery, m) for m in settlement.publishes):
            # Tried again on a later delivery; the delivery limit bounds how often.
            channel.basic_nack(delivery.tag, requeue=True)
        else:
            channel.basic_ack(delivery.tag)
        self._in_flight.discard(delivery.tag)

    def _deliver(self, delivery: Delivery, message: Outgoing) -> bool:
        """Publish what a delivery owes; a reply no queue takes goes to the dead letters instead."""
        if self.publish(message):
            return True
        if message.dead_letter_reason:
            log.warning("reply.unroutable", reply_to=message.routing_key)
            reason = f"{message.dead_letter_reason}: no queue named {message.routing_key!r} took it"
            if self.publish(dead_letter(delivery, self._handler.queue.name, reason, Code.NOT_FOUND, message.body)):
                return True
        log.error("settle.publish_refused", exchange=message.exchange, routing_key=message.routing_key)
        return False

    def submit(self, delivery: Delivery, work: Callable[[], Settlement]) -> None:
        connection = self._connection
        assert connection is not None
        self._pool.submit(self._run_work, connection, delivery, work)

    # --- pool threads -------------------------------------------------------

    def _run_work(
        self, connection: pika.BlockingConnection, delivery: Delivery, work: Callable[[], Settlement]
    ) -> None:
        try:
            settlement = work()
        except Exception as exc:
            log.exception("worker.task_failed", queue=self._handler.queue.name)
            settlement = self._handler.on_error(delivery, exc)
        try:
            connection.add_callback_threadsafe(partial(self.settle, delivery, settlement))
        except pika.exceptions.ConnectionWrongStateError:
            log.warning("worker.settle_dropped", reason="connection closed; message will be redelivered")


def declare(channel: BlockingChannel, queues: tuple[QueueSpec, ...]) -> None:
    """Declare every exchange, then these queues and their bindings; idempotent, so every start may."""
    for exchange, kind in contract.EXCHANGES.items():
        channel.exchange_declare(exchange, exchange_type=kind, durable=True)
    for spec in queues:
        channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        if spec.exchange:
            channel.queue_bind(spec.name, spec.exchange, routing_key=spec.routing_key)

"""One connection to the broker, and the one place where a delivery is settled on the wire.

A `Link` is a pika connection with its one channel in confirm mode: it declares the
topology, consumes the worker's queues, publishes (mandatory, confirmed without
waiting: `PipelinedConfirms`) and settles deliveries. `Link.settle` is the only code
that acks or rejects a delivery:

    publish what the delivery owes -> their confirms -> a reply that no queue took
    becomes a dead letter -> ack; or, when the broker would not take what is owed,
    reject with requeue (the queue's delivery limit bounds how often).

Each link has a generation number, and each delivery the generation of the link it
came on. Once a link is gone, the broker has put its unacked deliveries back: settling
one of them, or starting its work, is skipped (its redelivery does it), and the sink's
idempotent write keeps its record single.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.spec
import structlog

from multillm import tracing
from multillm.contract import QueueSpec
from multillm.errors import Code, ConnectionLost
from multillm.metrics import WorkerMetrics
from multillm.workers.amqp_session import AmqpSession
from multillm.workers.confirms import PipelinedConfirms, ignore
from multillm.workers.messages import Delivery, Outgoing, Settlement, dead_letter, last_resort
from multillm.workers.topology import declare

log = structlog.get_logger(__name__)


# Errors after which the connection (or its channel) is gone and must be rebuilt.
CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    ConnectionError,
    OSError,
)

REQUEUE = Settlement(requeue=True)


class Link:
    """One connection and its channel; build it with `await Link.open(...)`. On the event loop only."""

    def __init__(self, session: AmqpSession, confirms: PipelinedConfirms, generation: int) -> None:
        self.session = session
        self.generation = generation
        self._confirms = confirms
        self._unsettled: set[int] = set()
        self._consumer_tags: list[str] = []
        # Resolved when a delivery is settled, for `drained` (which makes a new one each time).
        self._settled: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls,
        parameters: pika.connection.Parameters,
        generation: int,
        *,
        prefetch: int,
        queues: tuple[QueueSpec, ...],
        metrics: WorkerMetrics,
    ) -> Link:
        """Connect, put the channel in confirm mode, set the prefetch and declare `queues`.

        Raises:
            ConfigError: the broker refused the topology (see `topology.declare`).
            pika.exceptions.AMQPError, OSError: the broker is unreachable or went away.
        """
        session = await AmqpSession.open(parameters)
        try:
            observe = lambda message, result: metrics.published(  # noqa: E731
                message.kind, message.about, message.code, result
            )
            confirms = await PipelinedConfirms.start(session, session.lose, observe)
            channel = session.channel
            assert channel is not None
            await session.call(channel.basic_qos, prefetch_count=prefetch)
            await declare(session, queues)
            # Bound to this session: a late callback of an old connection must not end a new one.
            channel.add_on_cancel_callback(
                lambda frame: session.lose(ConnectionLost("the broker cancelled the consumer"))
            )
        except BaseException:
            await session.aclose()
            raise
        return cls(session, confirms, generation)

    @property
    def gone(self) -> asyncio.Future[BaseException]:
        """Done, with the reason, once the connection or the channel is gone."""
        return self.session.gone

    @property
    def unsettled(self) -> int:
        """Deliveries taken on this link and not yet acked or rejected."""
        return len(self._unsettled)

    def consume(self, queue: str, on_delivery: Callable[[Delivery], None]) -> None:
        """Start consuming `queue`; `on_delivery` gets each message, on the loop, inside pika's frame handling."""

        def on_message(
            channel: pika.channel.Channel,
            method: pika.spec.Basic.Deliver,
            props: pika.BasicProperties,
            body: bytes,
        ) -> None:
            span = tracing.consumed(queue, props, len(body), method.redelivered) if tracing.ENABLED else None
            delivery = Delivery(method.delivery_tag, props, body, method.redelivered, self.generation, queue, span)
            if self.owns(delivery):  # else it arrived as the link ended: the broker redelivers it
                self._unsettled.add(delivery.tag)
                on_delivery(delivery)

        channel = self.session.channel
        assert channel is not None
        self._consumer_tags.append(channel.basic_consume(queue, on_message))

    async def cancel_consumers(self) -> None:
        """Stop taking messages, on every queue at once (those prefetched stay ours until settled)."""
        channel = self.session.channel
        assert channel is not None

        async def cancel(tag: str) -> None:
            with contextlib.suppress(*CONNECTION_ERRORS, TimeoutError):
                await asyncio.wait_for(self.session.call(channel.basic_cancel, tag), 5)

        await asyncio.gather(*(cancel(tag) for tag in self._consumer_tags))

    def owns(self, delivery: Delivery) -> bool:
        """Whether `delivery` came on this link and the link is still open, so that it may be settled."""
        return delivery.generation == self.generation and self.session.is_open

    def publish(self, messages: Sequence[Outgoing]) -> asyncio.Future[list[bool]]:
        """Publish `messages` now, confirmed (and mandatory unless one says otherwise), without waiting.

        The future gets, per message, whether a queue took it (False: unroutable, refused
        by the broker, or not even encodable); it fails with the reason if the link is lost
        first. Never raises.
        """
        taken: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        # Retrieved here as well: work that never began (requeued on a stop) leaves nobody to await it.
        taken.add_done_callback(_retrieve)
        self.session.watch(taken)
        try:
            self._confirms.publish_all(messages, partial(_resolve, taken))
        except CONNECTION_ERRORS as exc:
            self.lose(exc)
        except Exception:
            log.exception("publish.failed", messages=len(messages))
            _resolve(taken, [False] * len(messages))
        return taken

    def send(self, delivery: Delivery, messages: Sequence[Outgoing]) -> None:
        """Publish `messages` for `delivery` now, with nothing waiting on their confirms (`Running.send`);
        dropped when the delivery's link is gone (its redelivery sends them again). Never raises."""
        if not self.owns(delivery):
            return
        try:
            self._confirms.publish_all(messages, ignore)
        except CONNECTION_ERRORS as exc:
            self.lose(exc)
        except Exception:
            log.exception("publish.failed", messages=len(messages))

    def settle(self, delivery: Delivery, settlement: Settlement) -> None:
        """Settle `delivery` as `settlement` says: the one place that acks or rejects. Never raises:
        a failure ends the link, and the broker redelivers what it had not settled."""
        if not self.owns(delivery):
            if delivery.span is not None:
                tracing.settled(delivery.span, "lost")
            # The broker redelivers it, and the sink's idempotent write keeps the record single.
            log.warning(
                "worker.settle_dropped",
                queue=delivery.queue,
                message_id=delivery.properties.message_id,
                reason="connection closed; message will be redelivered",
            )
            return
        try:
            if settlement.requeue:
                self._finish(delivery, [False])
            else:
                self._publish_owed(delivery, settlement.publishes)
        except CONNECTION_ERRORS as exc:
            self.lose(exc)
        except Exception as exc:  # a bug: its delivery would stay unacked; the broker redelivers it
            log.exception("settle.failed", queue=delivery.queue)
            self.lose(ConnectionLost(f"settling failed: {type(exc).__name__}"))

    def _publish_owed(self, delivery: Delivery, owed: list[Outgoing]) -> None:
        try:
            self._confirms.publish_all(owed, partial(self._after_publish, delivery, owed))
        except CONNECTION_ERRORS:
            raise
        except Exception:
            # Something it owes cannot even be encoded: a retry would fail the same way.
            log.exception("settle.failed", queue=delivery.queue)
            self._confirms.publish_all(last_resort(delivery).publishes, partial(self._finish, delivery))

    def _after_publish(self, delivery: Delivery, owed: Sequence[Outgoing], taken: list[bool]) -> None:
        """What a delivery owed is confirmed; a reply no queue took goes to the dead letters instead."""
        refused = [m for m, ok in zip(owed, taken, strict=True) if not ok]
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
        if dead and self.owns(delivery):
            self._confirms.publish_all(dead, partial(self._finish, delivery))
        else:
            self._finish(delivery, [True])

    def _finish(self, delivery: Delivery, taken: list[bool]) -> None:
        """Ack when everything owed was taken; otherwise requeue (the delivery limit bounds how often)."""
        if not self.owns(delivery):
            return
        if all(taken):
            self._confirms.ack(delivery.tag)
        else:
            self._confirms.requeue(delivery.tag)
        if delivery.span is not None:
            tracing.settled(delivery.span, "ack" if all(taken) else "requeue")
        self._unsettled.discard(delivery.tag)
        if self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    async def drained(self) -> None:
        """Return once every delivery taken on this link is settled (what it owed confirmed, its ack
        sent), or the link is gone."""
        while self._unsettled and not self.gone.done():
            self._settled = asyncio.get_running_loop().create_future()
            either: set[asyncio.Future[Any]] = {self._settled, self.gone}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)

    def lose(self, reason: BaseException) -> None:
        """Give the link up (the consumer reconnects): every wait on it fails with `reason`."""
        self.session.lose(reason)

    async def close(self) -> None:
        """Close the connection; the broker requeues what was not settled."""
        await self.session.aclose()


def _resolve(future: asyncio.Future[list[bool]], taken: list[bool]) -> None:
    if not future.done():  # the session may have failed it first
        future.set_result(taken)


def _retrieve(future: asyncio.Future[list[bool]]) -> None:
    if not future.cancelled():
        future.exception()

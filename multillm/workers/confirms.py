"""Publisher confirms without waiting: many publishes in flight share the broker's round trips.

Waiting for each publish's confirm before the next would cost a round trip each;
on a quorum queue that wait is a replicated, fsynced write (profiled with pika's
`BlockingChannel`: two thirds of a worker's time at 300 requests/s). pika's
asynchronous channel reports confirms by callback instead (pika's asynchronous
publisher example does the same). We publish, count delivery tags, and run each
publish's callback once its confirm arrives.

A mandatory message that no queue takes comes back as `Basic.Return` before its
`Basic.Ack`; the return is matched to the publish by exchange, routing key and
message and correlation ids. Those are unique among a worker's unconfirmed
messages but for rare duplicates (a request delivered twice at once); when a
return matches several, all of them count as not taken: a reply dead-lettered
twice is better than one lost.

A message the broker refuses (a nack) is published again after a short wait, a few times
(`config.REFUSED_PUBLISH_WAITS`), each time on a channel of its own: a quorum queue may refuse
while it cannot take a message just then, and RabbitMQ 3.10 keeps refusing, for as long as
the channel lives, a channel whose first publish to a quorum queue came while the queue's
leader was on a node that had just died (its queue client keeps asking the dead node; a new
channel starts from the new leader). Workers reconnect at exactly that moment when a node
dies. Only after the last wait does a message count as not taken.

Threads: only the event loop's thread touches this, as every pika object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.channel
import pika.spec
import structlog
from opentelemetry.trace import Span

from multillm import tracing
from multillm.config import REFUSED_PUBLISH_WAITS
from multillm.workers.amqp_session import AmqpSession
from multillm.workers.messages import Outgoing

log = structlog.get_logger(__name__)

_Key = tuple[str, str, str | None, str | None]
# Called with whether each message was taken (confirmed and routed), in order.
Then = Callable[[list[bool]], None]


def _key(exchange: str, routing_key: str, props: pika.BasicProperties) -> _Key:
    return exchange, routing_key, props.message_id, props.correlation_id


def ignore(taken: list[bool]) -> None:
    """A `Then` for messages whose outcome nobody waits for."""


@dataclass(slots=True)
class _Batch:
    """Messages published together; `then` runs when the last of them is confirmed."""

    taken: list[bool | None]
    then: Then

    def resolve(self, index: int, taken: bool) -> bool:
        """Record one outcome; True when this completed the batch."""
        self.taken[index] = taken
        return all(t is not None for t in self.taken)


@dataclass(slots=True)
class _Unconfirmed:
    message: Outgoing
    key: _Key
    batch: _Batch
    index: int
    returned: bool = False
    refusals: int = 0
    # The publish's span, when this process exports traces; ended with the broker's answer.
    span: Span | None = None


class PipelinedConfirms:
    """Confirmed publishing on one channel, without waiting in `publish_all`; build it with `start`.

    Args:
        channel: a channel not yet in confirm mode.
        on_failure: told when a `then` callback failed (its delivery would stay unacked: reconnect).
        observe: told each publish's outcome: `ok`, `unroutable` or `refused` (for the metrics).
    """

    def __init__(
        self,
        session: AmqpSession,
        on_failure: Callable[[Exception], None],
        observe: Callable[[Outgoing, str], None] = lambda message, outcome: None,
    ) -> None:
        assert session.channel is not None
        self._session = session
        self._channel = session.channel
        self._on_failure = on_failure
        self._observe = observe
        self._unconfirmed: dict[int, _Unconfirmed] = {}
        self._next_tag = 1
        self._done: list[_Batch] = []
        self._scheduled = False
        self._retries: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(
        cls,
        session: AmqpSession,
        on_failure: Callable[[Exception], None],
        observe: Callable[[Outgoing, str], None] = lambda message, outcome: None,
    ) -> PipelinedConfirms:
        """Put the session's channel in confirm mode and publish on it from now on."""
        confirms = cls(session, on_failure, observe)
        confirms._channel.add_on_return_callback(confirms._on_return)
        await session.call(confirms._channel.confirm_delivery, confirms._on_confirm)
        return confirms

    def publish_all(self, messages: Sequence[Outgoing], then: Then) -> None:
        """Publish `messages` (confirmed; mandatory unless one says not); `then(taken)` runs on the loop
        when all are confirmed.

        Raises:
            Exception: a message's properties cannot be encoded (nothing of it was sent).
        """
        batch = _Batch([None] * len(messages), then)
        if not messages:
            self._finish(batch)
            return
        for index, message in enumerate(messages):
            span = tracing.publishing(message) if tracing.ENABLED else None
            try:
                self._channel.basic_publish(
                    message.exchange, message.routing_key, message.body, message.properties, mandatory=message.mandatory
                )
            except Exception:
                # Those already sent are confirmed into a batch nobody waits for; the caller settles otherwise.
                batch.then = ignore
                if span is not None:
                    tracing.published(span, "failed")
                raise
            self._unconfirmed[self._next_tag] = _Unconfirmed(
                message, _key(message.exchange, message.routing_key, message.properties), batch, index, span=span
            )
            self._next_tag += 1

    def ack(self, delivery_tag: int) -> None:
        """Ack a delivery."""
        self._channel.basic_ack(delivery_tag)

    def requeue(self, delivery_tag: int) -> None:
        """Reject a delivery back to its queue (the queue's delivery limit bounds how often).

        `basic.reject`, not `basic.nack`: from RabbitMQ 4.3 a quorum queue no longer counts a
        nack with requeue toward `x-delivery-limit`, and the message could come back for ever.
        """
        self._channel.basic_reject(delivery_tag, requeue=True)

    # --- pika's callbacks, inside its frame handling: record only ---------------

    def _on_return(
        self, channel: Any, method: pika.spec.Basic.Return, props: pika.BasicProperties, body: bytes
    ) -> None:
        key = _key(method.exchange, method.routing_key, props)
        matches = [u for u in self._unconfirmed.values() if u.key == key and not u.returned]
        if len(matches) != 1:
            log.warning(
                "publish.return_ambiguous" if matches else "publish.return_unmatched",
                exchange=method.exchange,
                routing_key=method.routing_key,
                candidates=len(matches),
            )
        for match in matches:
            match.returned = True

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = [t for t in self._unconfirmed if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            entry = self._unconfirmed.pop(tag, None)
            if entry is not None:
                self._confirmed(entry, acked)

    def _confirmed(self, entry: _Unconfirmed, acked: bool) -> None:
        """The broker answered one publish of `entry`: resolve it, or try again if refused and waits are left."""
        if not acked:
            retry = entry.refusals < len(REFUSED_PUBLISH_WAITS)
            wait = REFUSED_PUBLISH_WAITS[entry.refusals] if retry else None
            log.warning("publish.refused", exchange=entry.key[0], routing_key=entry.key[1], retry_in=wait)
            if wait is not None:
                entry.refusals += 1
                asyncio.get_running_loop().call_later(wait, self._publish_again, entry)
                return
            # Refused for good (e.g. a full queue with reject-publish): not taken, like unroutable.
        result = "refused" if not acked else "unroutable" if entry.returned else "ok"
        self._observe(entry.message, result)
        if entry.span is not None:
            tracing.published(entry.span, result)
        if entry.batch.resolve(entry.index, acked and not entry.returned):
            self._done.append(entry.batch)
        if self._done and not self._scheduled:
            # What the callbacks do (publish, ack) must not run inside pika's frame handling.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run_done)

    def _publish_again(self, entry: _Unconfirmed) -> None:
        """Publish a refused message once more, on a channel of its own (see the module's docstring);
        its batch waits for it."""
        if self._session.gone.done():
            return  # the link is gone with it: whoever waits on the batch is failed by the session
        task = asyncio.ensure_future(self._publish_alone(entry))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _publish_alone(self, entry: _Unconfirmed) -> None:
        message = entry.message
        confirmed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_close(channel: pika.channel.Channel, reason: BaseException) -> None:
            if not confirmed.done():
                confirmed.set_exception(reason)

        def on_confirm(frame: pika.frame.Method) -> None:
            if not confirmed.done():
                confirmed.set_result(isinstance(frame.method, pika.spec.Basic.Ack))

        def on_return(*_: object) -> None:
            entry.returned = True

        channel: pika.channel.Channel | None = None
        entry.returned = False
        try:
            channel = await self._session.side_channel(on_close)
            channel.add_on_return_callback(on_return)
            await self._session.call(channel.confirm_delivery, on_confirm)
            self._session.watch(confirmed)
            channel.basic_publish(
                message.exchange, message.routing_key, message.body, message.properties, mandatory=message.mandatory
            )
            acked = await confirmed
        except Exception as exc:
            if self._session.gone.done():
                return  # the session failed whoever waits on the batch
            # The broker closed the side channel (it refused the message outright): refused.
            log.warning("publish.retry_failed", routing_key=message.routing_key, error=str(exc))
            acked = False
        finally:
            if channel is not None and channel.is_open:
                channel.close()
        self._confirmed(entry, acked)

    def _run_done(self) -> None:
        self._scheduled = False
        done, self._done = self._done, []
        failed: Exception | None = None
        for batch in done:
            try:
                self._finish(batch)
            except Exception as exc:  # a bug in a callback: the others still run
                log.exception("publish.callback_failed")
                failed = failed or exc
        if failed is not None:
            # Its delivery would stay unacked for ever: reconnect, so that the broker redelivers
            # it (the queue's delivery limit bounds how often).
            self._on_failure(failed)

    @staticmethod
    def _finish(batch: _Batch) -> None:
        batch.then([bool(t) for t in batch.taken])

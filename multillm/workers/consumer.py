"""The consumer: takes the worker's deliveries, lets the handlers decide, carries the decisions out, reconnects.

A message's life, top to bottom:

1. A delivery arrives on a `Link` (one connection). One delivered too often goes to its
   handler's `on_give_up`, any other to its `on_delivery`.
2. The handler decides (`messages.Decision`): a `Settlement` now (an invalid request's
   error reply), or `Work`: its `publish_first` (the fan-out copies) go out at once, and
   its `run` (call the model, write the record, build the reply) waits for a call slot
   (`Admission`).
3. A handler or a work that raises goes to the handler's `on_error`, which decides as
   well (an error record for the model, an error reply, a dead letter); if that raises
   too, the message is dead-lettered bare (`messages.last_resort`).
4. Once what was published first is confirmed, `Link.settle` publishes what the
   settlement owes and then acks, or requeues: the only place a delivery is settled.

All of it runs on one thread and one asyncio event loop, pika's `AsyncioConnection`
included: with a thread per call, 512 calls in flight spent a third of the worker's CPU
passing the GIL around (docs/benchmarks.md). What blocks, the sink's writes, goes to the
sink's own threads (`workers/group_commit.py`).

`stop()` ends `serve()` in the order that `workers._serve` documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TypeVar

import structlog

from multillm import contract, tracing
from multillm.config import PREFETCH_PER_CALL, RECONNECT_FIRST_WAIT, RECONNECT_MAX_WAIT, Failover
from multillm.errors import ConfigError, describe
from multillm.metrics import WorkerMetrics
from multillm.workers.admission import Admission
from multillm.workers.link import CONNECTION_ERRORS, REQUEUE, Link
from multillm.workers.messages import Decision, Delivery, Handler, Running, Settlement, Work, last_resort
from multillm.workers.nodes import BrokerNodes
from multillm.workers.topology import queues_for

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Consumer:
    """Runs each handler against its queue until `stop()`; reconnects whenever the broker goes away.

    All the queues are consumed on one channel and share the call slots; a delivery goes
    to the handler of the queue it came from. Every method runs on the event loop.
    """

    def __init__(
        self,
        broker_url: str,
        handlers: Sequence[Handler],
        *,
        concurrency: int = 4,
        grace_seconds: float = 30.0,
        metrics: WorkerMetrics | None = None,
        failover: Failover = "shuffle",
    ) -> None:
        """Raises:
        ConfigError: `broker_url` is malformed.
        """
        self._metrics = metrics or WorkerMetrics()
        self._handlers = {handler.queue.name: handler for handler in handlers}
        # Names the process in `rabbitmqctl list_connections` and the management UI.
        name = f"multillm worker pid {os.getpid()}: {', '.join(self._handlers)}"
        self._nodes = BrokerNodes(broker_url, failover, connection_name=name)
        self._queues = queues_for([handler.queue for handler in handlers])
        self._concurrency = concurrency
        self._grace = grace_seconds
        self._admission = Admission(concurrency)
        self._link: Link | None = None
        self._generation = 0
        self._stopping = asyncio.Event()
        self._aborting = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """Deliveries taken on the current connection and not yet settled."""
        return self._link.unsettled if self._link is not None else 0

    def stop(self) -> None:
        """Stop taking messages, finish those in flight (up to the grace period), then return from `serve`."""
        self._stopping.set()

    @property
    def aborted(self) -> bool:
        return self._aborting.is_set()

    async def cancel_running(self) -> None:
        """Cancel the calls still running (past the grace period, or after `abort`); after `serve`."""
        await self._admission.cancel()

    def abort(self) -> None:
        """Stop now: calls in flight are abandoned and the broker redelivers their messages."""
        self._stopping.set()
        self._aborting.set()

    async def serve(self) -> int:
        """Consume until stopped; returns the exit code (1 after `abort`). Never returns for a lost broker.

        Raises:
            ConfigError: the broker refused the topology (retrying cannot help).
        """
        backoff = RECONNECT_FIRST_WAIT
        while not self._stopping.is_set():
            try:
                link = await self._unless_stopped(self._connect())
                if link is None:
                    break
                backoff = RECONNECT_FIRST_WAIT
                await self._consume_until_stopped(link)
            except ConfigError:
                raise
            except Exception as exc:  # the broker went away, or a bug: reconnect either way
                event = "broker.connection_lost" if isinstance(exc, CONNECTION_ERRORS) else "worker.loop_failed"
                log.warning(event, node=self._nodes.current, error=describe(exc), retry_in=backoff)
                # Close what is left of it: a half-dead connection would keep its deliveries unacked.
                await self._close_link()
                await self._unless_stopped(asyncio.sleep(backoff * random.uniform(0.5, 1.5)))
                backoff = min(backoff * 2, RECONNECT_MAX_WAIT)
        if self._link is None:
            # Stopped while disconnected: calls still running may yet write their records, which
            # their redeliveries will then find instead of paying for the call again.
            await self._unless_aborted(self._admission.wait_idle(self._grace))
        await self._close_link()
        log.info("worker.stopped", queues=list(self._handlers), abandoned=self._admission.running)
        return 1 if self._aborting.is_set() else 0

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> T | None:
        """The result of `awaitable`, or None if a stop comes first (it is cancelled then):
        a broker that does not answer must not hold up a SIGTERM."""
        return await _unless(self._stopping, awaitable)

    async def _unless_aborted(self, awaitable: Awaitable[T]) -> T | None:
        return await _unless(self._aborting, awaitable)

    async def _connect(self) -> Link:
        """A link to the first node that answers, in `BrokerNodes` order.

        Raises:
            the last node's error, when none answered.
        """
        self._generation += 1
        failure: BaseException | None = None
        for node, parameters in self._nodes.attempts():
            try:
                link = await Link.open(
                    parameters,
                    self._generation,
                    prefetch=PREFETCH_PER_CALL * self._concurrency,
                    queues=self._queues,
                    metrics=self._metrics,
                )
            except CONNECTION_ERRORS as exc:
                failure = exc
                if len(self._nodes) > 1:
                    log.warning("broker.node_unreachable", node=node, error=describe(exc))
                continue
            self._nodes.connected(node)
            self._link = link
            for queue, handler in self._handlers.items():
                link.consume(queue, partial(self._on_delivery, link, handler))
            log.info("worker.consuming", node=node, queues=list(self._handlers), concurrency=self._concurrency)
            return link
        assert failure is not None
        raise failure

    async def _consume_until_stopped(self, link: Link) -> None:
        """Consume until a stop, then: cancel the consumers, requeue what has not begun, drain.

        Raises:
            the reason the link was lost, if it was lost first.
        """
        gone = await self._unless_stopped(asyncio.shield(link.gone))
        if gone is not None:
            raise gone
        await self._unless_aborted(link.cancel_consumers())
        for delivery in self._admission.take_waiting():
            link.settle(delivery, REQUEUE)
        with contextlib.suppress(TimeoutError):
            await self._unless_aborted(asyncio.wait_for(link.drained(), self._grace))
        if link.unsettled and not link.gone.done():
            log.warning("worker.grace_expired", unacked=link.unsettled, aborted=self._aborting.is_set())

    async def _close_link(self) -> None:
        link, self._link = self._link, None
        self._admission.forget()
        if link is not None:
            await link.close()

    # --- a delivery's life ---------------------------------------------------

    def _on_delivery(self, link: Link, handler: Handler, delivery: Delivery) -> None:
        with tracing.active(delivery.span):  # what it publishes carries its trace on
            self._decide(link, handler, delivery)

    def _decide(self, link: Link, handler: Handler, delivery: Delivery) -> None:
        give_up = delivery.delivery_count >= contract.GIVE_UP_AT_DELIVERY_COUNT
        self._metrics.consumed(delivery.queue, delivery.redelivered, give_up)
        # Who decides if the work fails: the handler, unless the work is already its `on_error`'s.
        on_failure: Handler | None = handler
        try:
            if give_up:
                log.error(
                    "message.given_up",
                    queue=delivery.queue,
                    deliveries=delivery.delivery_count + 1,
                    message_id=delivery.properties.message_id,
                )
                decision = handler.on_give_up(delivery)
            else:
                decision = handler.on_delivery(delivery)
        except Exception as exc:
            log.exception("worker.handler_failed", queue=delivery.queue, message_id=delivery.properties.message_id)
            decision, on_failure = _on_error(handler, delivery, exc, None), None
        if isinstance(decision, Settlement):
            link.settle(delivery, decision)
        elif self._stopping.is_set():
            # Came in while the consumers were being cancelled: back to the queue, nothing published.
            link.settle(delivery, REQUEUE)
        else:
            taken = link.publish(decision.publish_first) if decision.publish_first else _nothing_published()
            self._admission.admit(delivery, partial(self._in_slot, link, on_failure, delivery, decision, taken))

    async def _in_slot(
        self,
        link: Link,
        on_failure: Handler | None,
        delivery: Delivery,
        work: Work,
        taken: asyncio.Future[list[bool]],
        called: Callable[[], None],
    ) -> None:
        """In a call slot (given back at `called()`): run the work, then settle what it returns."""
        if not link.owns(delivery):
            return  # its connection is gone and the broker has put it back: calling the model would be paid twice
        if self._stopping.is_set():
            link.settle(delivery, REQUEUE)  # came in while the consumer was being cancelled: not begun
            return
        with tracing.active(delivery.span):
            settlement = await _settlement_of(link, on_failure, delivery, work, taken, called)
            # Never an ack before what went out first is confirmed: an ack must not lose a fan-out copy.
            if not taken.done():
                await asyncio.wait([taken])
            if settlement is not None:
                link.settle(delivery, settlement)


async def _settlement_of(
    link: Link,
    on_failure: Handler | None,
    delivery: Delivery,
    work: Work,
    taken: asyncio.Future[list[bool]],
    called: Callable[[], None],
) -> Settlement | None:
    """What `work` returns, or what `on_failure.on_error` decides when it raises (None: the work is
    an `on_error`'s already, and its failure leaves the last resort); None if its connection is gone."""
    try:
        return await work.run(Running(taken, partial(link.send, delivery), called))
    except Exception as exc:
        if isinstance(exc, CONNECTION_ERRORS) and not link.owns(delivery):
            return None  # a publish it awaited failed with its connection: the broker redelivers it
        log.exception("worker.task_failed", queue=delivery.queue, message_id=delivery.properties.message_id)
        if on_failure is None:
            return last_resort(delivery)
        if not taken.done():
            await asyncio.wait([taken])
        if taken.exception() is not None:
            return None  # lost with its connection: the broker redelivers it
        decision = _on_error(on_failure, delivery, exc, taken.result())
    if isinstance(decision, Settlement):
        return decision
    return await _settlement_of(link, None, delivery, decision, _nothing_published(), called)


def _on_error(handler: Handler, delivery: Delivery, error: Exception, taken: list[bool] | None) -> Decision:
    try:
        return handler.on_error(delivery, error, taken)
    except Exception:
        log.exception("worker.on_error_failed", queue=delivery.queue)
        return last_resort(delivery)


def _nothing_published() -> asyncio.Future[list[bool]]:
    done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
    done.set_result([])
    return done


async def _unless(event: asyncio.Event, awaitable: Awaitable[T]) -> T | None:
    """The result of `awaitable`, or None when `event` is set first (`awaitable` is cancelled then)."""
    task = asyncio.ensure_future(awaitable)
    interrupted = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupted.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None

"""Publishing requests, scores and replayed copies with kombu: confirmed, persistent, mandatory, reconnecting.

Threads: `RequestPublisher.publish` may be called from any number of threads.
Each call borrows a producer from a kombu `ProducerPool`; every pooled producer
has a connection and channel of its own (py-amqp connections are not
thread-safe), and `confirm_publish` makes the publish wait for the broker's ack.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import amqp.exceptions
import kombu
import kombu.exceptions
import kombu.pools

from multillm import contract, tracing
from multillm.config import PUBLISH_RETRY
from multillm.contract import QueueSpec
from multillm.errors import BrokerUnavailable, Code, Unavailable
from multillm.logging_setup import get_logger
from multillm.schemas import FanOutCopy, V1CreateMultiLLMChatCompletionRequest, V1Score, encode
from multillm.urls import broker_nodes

log = get_logger(__name__)

_TICK_SECONDS: Final = 0.5
# The longest wait for one confirm. Without it a publish into a blocked broker
# (memory or disk alarm) or a half-open connection would wait for ever.
CONFIRM_TIMEOUT_SECONDS: Final = 15.0


# Seconds to wait for one node to answer a connect (kombu's default).
CONNECT_TIMEOUT_SECONDS: Final = 5.0


def connect(broker_url: str) -> kombu.Connection:
    """A kombu connection whose channels publish with confirms.

    kombu spends `connect_retries_timeout` on all the tries of one connect: a window of one
    node's connect timeout per node listed, so that a node that never answers (a dead
    machine, not a refusing port) still leaves time to try the next one.
    """
    nodes = len(broker_nodes(broker_url))
    return kombu.Connection(
        broker_url,
        transport_options={"confirm_publish": True, "connect_retries_timeout": nodes * CONNECT_TIMEOUT_SECONDS},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        heartbeat=30,
    )


def drain(
    connection: kombu.Connection,
    *,
    stop: Callable[[], bool],
    idle_timeout: float | None = None,
    on_idle: Callable[[], None] | None = None,
) -> None:
    """Dispatch messages on `connection` until `stop()`, or `idle_timeout` seconds without one.

    `on_idle` runs after each tick that brought no message. kombu sends heartbeats
    only when asked to: without `heartbeat_check` the broker drops a connection that
    waited quietly for two heartbeat intervals.
    """
    last = time.monotonic()
    while not stop():
        try:
            # The tick only bounds how late stop() and heartbeats are noticed; a message wakes it at once.
            connection.drain_events(timeout=_TICK_SECONDS)
            last = time.monotonic()
        except TimeoutError:
            if on_idle is not None:
                on_idle()
            if idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                return
        connection.heartbeat_check()


def kombu_queue(spec: QueueSpec) -> kombu.Queue:
    exchange = kombu.Exchange(spec.exchange, contract.EXCHANGES[spec.exchange], durable=True) if spec.exchange else ""
    return kombu.Queue(
        spec.name,
        exchange,
        routing_key=spec.routing_key,
        durable=True,
        queue_arguments=spec.arguments,
    )


def declare_queues(connection: kombu.Connection, *specs: QueueSpec) -> None:
    """Declare exchanges, queues and bindings, and remove the obsolete bindings of these queues,
    idempotently (as the workers do: `workers.consumer.declare`)."""
    channel = connection.default_channel
    for name, kind in contract.EXCHANGES.items():
        kombu.Exchange(name, kind, durable=True)(channel).declare()
    for spec in specs:
        kombu_queue(spec)(channel).declare()
    declared = {spec.name for spec in specs}
    for queue, exchange, routing_key in contract.OBSOLETE_BINDINGS:
        if queue in declared:
            channel.queue_unbind(queue=queue, exchange=exchange, routing_key=routing_key)


def queue_counts(broker_url: str, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of `queue` now; (0, 0) when it does not exist yet."""
    with connect(broker_url) as connection:
        try:
            _, messages, consumers = connection.default_channel.queue_declare(queue, passive=True)
        except kombu.exceptions.ChannelError:
            return 0, 0
        return int(messages), int(consumers)


def new_request_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class _Message:
    """What one publish sends: where, its AMQP `type`, body and properties."""

    exchange: str
    routing_key: str
    type: str
    body: bytes
    message_id: str
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)


class RequestPublisher:
    """Publishes requests to `multillm.requests` and scores to `multillm.scores`; see the module
    docstring for threading."""

    def __init__(self, broker_url: str, *, pool_size: int = 8) -> None:
        self._connection = connect(broker_url)
        self._nodes = len(broker_nodes(broker_url))
        declare_queues(
            self._connection,
            contract.requests_queue(),
            contract.scores_queue(),
            contract.triage_queue(),
            contract.dead_queue(),
        )
        self._returned: set[str] = set()
        self._declared: set[str] = set()
        self._lock = threading.Lock()
        producer = functools.partial(kombu.Producer, on_return=self._on_return)
        self._pool = kombu.pools.ProducerPool(self._connection.Pool(pool_size), limit=pool_size, Producer=producer)

    def declare_once(self, spec: QueueSpec) -> None:
        """Declare `spec` the first time it is named (reconnecting if need be).

        Raises:
            BrokerUnavailable: the broker could not be reached or refused the declaration.
        """
        if spec.name in self._declared:
            return
        try:
            with self._pool.connections.acquire(block=True) as connection:
                connection.ensure(
                    connection, lambda: declare_queues(connection, spec), **PUBLISH_RETRY.kombu(nodes=self._nodes)
                )()
        except Exception as exc:
            raise BrokerUnavailable(f"cannot declare queue {spec.name!r}: {exc}") from exc
        with self._lock:
            self._declared.add(spec.name)

    def publish(
        self,
        request: V1CreateMultiLLMChatCompletionRequest,
        *,
        reply_to: str | None,
        request_id: str | None = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> str:
        """Publish one request and wait for the broker's confirm; returns the request id.

        Args:
            request: the request to send.
            reply_to: the queue the reply goes to (None: no reply is sent).
            request_id: the AMQP `message_id`; a fresh UUID when None.
            correlation_id: echoed on the reply; the request id when None.
            timeout: seconds the caller will wait: becomes an absolute deadline header, so a
                worker never calls a model for it late and answers it with DEADLINE_EXCEEDED.
                Not an AMQP `expiration`, which counts from when the request entered the queue
                (the worker cannot read it back as a point in time) and, once it passes there,
                sends the request the long way round (through `multillm.triage`) to its reply 4.
            stream: ask for the primary's answer as it is written: chunk messages to `reply_to`
                before the reply (header `x-multillm-stream`).

        Raises:
            Unavailable: no queue is bound to the requests exchange.
            BrokerUnavailable: the broker did not confirm the publish, even after reconnecting.
        """
        request_id = request_id or new_request_id()
        headers: dict[str, Any] = {}
        if timeout is not None:
            headers[contract.HEADER_DEADLINE] = int((time.time() + timeout) * 1000)
        if stream:
            headers[contract.HEADER_STREAM] = True
        message = _Message(
            contract.REQUEST_EXCHANGE,
            contract.REQUEST_ROUTING_KEY,
            contract.TYPE_REQUEST,
            encode(request),
            message_id=request_id,
            correlation_id=correlation_id or request_id,
            reply_to=reply_to,
            headers=headers,
        )
        self._confirmed(message, f"request {request_id}", timeout)
        return request_id

    def publish_score(self, score: V1Score, *, timeout: float | None = None) -> str:
        """Publish one score to `multillm.scores` and wait for the broker's confirm; returns its id.

        Raises:
            Unavailable: no queue is bound to the scores exchange.
            BrokerUnavailable: the broker did not confirm the publish, even after reconnecting.
        """
        message = _Message(
            contract.SCORE_EXCHANGE, contract.SCORE_ROUTING_KEY, contract.TYPE_SCORE, encode(score), message_id=score.id
        )
        self._confirmed(message, f"score {score.id}", timeout)
        return score.id

    def publish_copy(self, copy: FanOutCopy, message_id: str, *, timeout: float | None = None) -> None:
        """Publish a fan-out copy to its model's queue, as the primary worker does (`multillm replay`),
        and wait for the broker's confirm. `message_id`: the log id its record will have.

        Raises:
            Unavailable: no queue is bound for the copy's model.
            BrokerUnavailable: the broker did not confirm the publish, even after reconnecting.
        """
        message = _Message(
            contract.MODEL_EXCHANGE, copy.model.name, contract.TYPE_FANOUT, encode(copy), message_id=message_id
        )
        self._confirmed(message, f"the copy of request {copy.request_id} for {copy.model.name}", timeout)

    def _confirmed(self, message: _Message, what: str, timeout: float | None) -> None:
        """Publish `message`, mandatory, and wait for its confirm.

        Raises:
            Unavailable: the broker returned it (no queue is bound for its routing key).
            BrokerUnavailable: the broker did not confirm it, even after reconnecting.
        """
        try:
            self._publish(message, timeout)
        except (OSError, kombu.exceptions.KombuError, amqp.exceptions.AMQPError) as exc:
            raise BrokerUnavailable(f"the broker did not confirm {what}: {exc}") from exc
        with self._lock:
            returned = message.message_id in self._returned
            self._returned.discard(message.message_id)
        if returned:
            raise Unavailable(
                Code.UNAVAILABLE, f"no queue is bound to exchange {message.exchange!r} for {message.routing_key!r}"
            )

    def _publish(self, message: _Message, timeout: float | None) -> None:
        # The caller's timeout bounds the whole publish too, reconnects included.
        confirm = CONFIRM_TIMEOUT_SECONDS if timeout is None else max(0.5, min(CONFIRM_TIMEOUT_SECONDS, timeout))
        with (
            tracing.client_publish(
                message.exchange, message.routing_key, message.message_id, message.correlation_id, message.headers
            ),
            self._pool.acquire(block=True, timeout=confirm) as producer,
        ):
            producer.publish(
                message.body,
                exchange=message.exchange,
                routing_key=message.routing_key,
                content_type=contract.CONTENT_TYPE,
                content_encoding="utf-8",
                delivery_mode=contract.PERSISTENT,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                type=message.type,
                headers=message.headers,
                mandatory=True,
                retry=True,
                retry_policy=PUBLISH_RETRY.kombu(within=timeout, nodes=self._nodes),
                timeout=confirm,
                confirm_timeout=confirm,
            )

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        # The broker sends basic.return before the confirm, so publish() sees it.
        message_id = message.properties.get("message_id")
        with self._lock:
            self._returned.add(str(message_id))

    def close(self) -> None:
        self._pool.force_close_all()
        self._pool.connections.force_close_all()
        self._connection.release()

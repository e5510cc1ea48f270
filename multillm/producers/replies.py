"""Reading replies: decoding them, and consuming a named, durable reply queue."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import kombu
import msgspec

from multillm import contract
from multillm.config import client_broker_url
from multillm.errors import Code, RpcError, describe
from multillm.logging_setup import get_logger
from multillm.producers.publishing import connect, declare_queues, drain, kombu_queue
from multillm.schemas import (
    RpcStatus,
    V1ChatCompletionChunk,
    V1MultiLLMChatCompletion,
    decode_chunk,
    decode_reply,
    decode_status,
)

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply as it arrived: a completion, or an RpcStatus, for the request `request_id`."""

    request_id: str | None
    completion: V1MultiLLMChatCompletion | None = None
    status: RpcStatus | None = None

    def result(self) -> V1MultiLLMChatCompletion:
        """The completion, or the typed RpcError the status stands for."""
        if self.completion is not None:
            return self.completion
        assert self.status is not None
        raise RpcError.from_status(self.status)


def decode_reply_message(body: bytes, message_type: str | None, correlation_id: str | None) -> Reply:
    """A reply from its body and AMQP `type`; an undecodable body becomes an INTERNAL status."""
    try:
        if message_type == contract.TYPE_ERROR:
            return Reply(correlation_id, status=decode_status(body))
        return Reply(correlation_id, completion=decode_reply(body))
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        return Reply(correlation_id, status=RpcStatus(code=Code.INTERNAL, message=f"undecodable reply: {exc}"))


def dispatch(
    message: kombu.Message,
    on_reply: Callable[[Reply], None],
    on_chunk: Callable[[str | None, V1ChatCompletionChunk], None] | None,
) -> bool:
    """Hand a message of a reply queue to `on_reply`, or a chunk of a streamed answer to `on_chunk`
    (dropped when None, or undecodable: the final reply has the whole text). True for a reply."""
    props = message.properties
    message_type, correlation_id = props.get("type"), props.get("correlation_id")
    if message_type != contract.TYPE_CHUNK:
        on_reply(decode_reply_message(message.body, message_type, correlation_id))
        return True
    if on_chunk is not None:
        try:
            chunk = decode_chunk(message.body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("chunk.undecodable", correlation_id=correlation_id, error=describe(exc))
            return False
        on_chunk(correlation_id, chunk)
    return False


class ReplyQueue:
    """A named, durable reply queue: publish with `reply_to=name`, read the replies later.

    Replies survive the consumer being away and the broker restarting; each is
    acked only after the handler returns, so a handler that raises loses nothing.
    """

    def __init__(self, broker_url: str | None = None, name: str | None = None) -> None:
        """Args:
            broker_url: the broker's AMQP URL; None: `$MULTILLM_BROKER_URL`, else the local broker.
            name: the queue's name (`ReplyQueue(name="my-service.replies")` for the default broker).

        Raises:
            ValueError: no name was given.
        """
        if not name:
            raise ValueError("a ReplyQueue needs the name of its queue")
        broker_url = client_broker_url(broker_url)
        self.name = name
        self._spec = contract.named_reply_queue(name)
        self._broker_url = broker_url
        self._connection = connect(broker_url)

    def declare(self) -> None:
        declare_queues(self._connection, self._spec)

    def consume(
        self,
        handler: Callable[[Reply], None],
        *,
        limit: int | None = None,
        idle_timeout: float | None = None,
        on_chunk: Callable[[str | None, V1ChatCompletionChunk], None] | None = None,
    ) -> int:
        """Call `handler` for each reply until `limit` replies, or `idle_timeout` seconds without one.

        `on_chunk(request_id, chunk)` gets the chunks of streamed answers (`Client.publish(...,
        stream=True)`), before their reply; `StreamText` turns them into text to show. Without
        it they are dropped. Chunks do not count toward `limit`.

        Returns:
            how many replies were handled.
        """
        self.declare()
        handled = 0

        def on_message(message: kombu.Message) -> None:
            nonlocal handled
            try:
                replied = dispatch(message, handler, on_chunk)
            except Exception:
                message.requeue()
                raise
            message.ack()
            handled += replied

        def enough() -> bool:
            return limit is not None and handled >= limit

        while True:
            try:
                with kombu.Consumer(
                    self._connection, [kombu_queue(self._spec)], on_message=on_message, prefetch_count=16
                ):
                    drain(self._connection, stop=enough, idle_timeout=idle_timeout)
                return handled
            except self._connection.connection_errors as exc:
                # Unacked replies go back to the queue: reconnect and carry on.
                log.warning("reply_queue.reconnecting", queue=self.name, error=describe(exc))
                self._connection.release()
                time.sleep(1.0)
                self._connection = connect(self._broker_url)

    def close(self) -> None:
        self._connection.release()

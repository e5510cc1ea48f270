"""`Client`: publish a request and wait for its reply, from any number of threads.

Threads: callers publish through `RequestPublisher` (a producer, connection and
channel each, from a pool). One daemon thread, `ReplyListener` (listener.py), owns the reply
connection: it blocks in `drain_events` on the client's own reply queue and
completes the waiting call whose correlation id the reply carries.

The reply queue is not exclusive and not auto-delete but expires when unused
(`x-expires`), so it outlives a dropped connection: replies that arrive while
the listener reconnects wait in it instead of being dropped.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Final

from multillm import contract
from multillm.config import client_broker_url
from multillm.errors import BrokerUnavailable, MultiLLMError, RequestTimeout
from multillm.logging_setup import get_logger
from multillm.producers.listener import ReplyListener
from multillm.producers.publishing import RequestPublisher, kombu_queue, new_request_id
from multillm.producers.replies import Reply
from multillm.producers.streaming import Item, ReplyStream
from multillm.schemas import (
    V1ChatCompletionChunk,
    V1CreateMultiLLMChatCompletionRequest,
    V1MultiLLMChatCompletion,
    V1Score,
    checked_score,
)
from multillm.urls import broker_nodes, mask_url

log = get_logger(__name__)

DEFAULT_TIMEOUT: Final = 120.0


class PendingReply(Future[V1MultiLLMChatCompletion]):
    """The future of one submitted request; `request_id` is its AMQP message and correlation id."""

    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id = request_id


class Client:
    """Sends multi-LLM requests and returns the primary model's reply. Thread-safe.

    Example:
        with Client() as client:
            reply = client.create(make_request(["mock/a", "mock/b"], "Hello"))
            print(reply.text)
    """

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
    ) -> None:
        """Connect, declare the client's reply queue and the request queue.

        Args:
            broker_url: the broker's AMQP URL; None: `$MULTILLM_BROKER_URL`, else
                `amqp://guest:guest@localhost:5672/%2F` (as the `multillm` command).
            timeout: seconds `create` waits for a reply unless told otherwise.
            pool_size: connections kept for publishing from concurrent threads.
            connect_timeout: seconds to wait for the broker when starting.

        Raises:
            BrokerUnavailable: no broker answered within `connect_timeout` seconds. Once
                connected, the client reconnects on its own for as long as it lives.
        """
        broker_url = client_broker_url(broker_url)
        self.timeout = timeout
        self._pending: dict[str, PendingReply] = {}
        # Streamed requests by id: where their chunks and final reply go (`stream`).
        self._streams: dict[str, Callable[[Item], None]] = {}
        self._lock = threading.Lock()
        spec = contract.client_reply_queue(uuid.uuid4().hex, replicated=len(broker_nodes(broker_url)) > 1)
        self.reply_queue = spec.name
        self._listener = ReplyListener(broker_url, kombu_queue(spec), self._on_reply, self._on_chunk)
        self._listener.start()
        self._listener.wait_ready(broker_url, connect_timeout)
        try:
            self._publisher = RequestPublisher(broker_url, pool_size=pool_size)
        except Exception as exc:
            self._listener.stop()
            raise BrokerUnavailable(f"cannot declare the request queue at {mask_url(broker_url)}: {exc}") from exc

    def create(
        self, request: V1CreateMultiLLMChatCompletionRequest, *, timeout: float | None = None
    ) -> V1MultiLLMChatCompletion:
        """Publish `request` and wait for its reply.

        Raises:
            RpcError: (a subclass per code) the pipeline answered with an RpcStatus; also
                `Unavailable` when no queue is bound to the requests exchange.
            BrokerUnavailable: the broker did not confirm the publish, even after reconnecting.
            RequestTimeout: no reply within `timeout` seconds (default: the client's).
        """
        timeout = self.timeout if timeout is None else timeout
        return self.wait(self.submit(request, timeout=timeout), timeout=timeout)

    def wait(self, future: PendingReply, *, timeout: float | None = None) -> V1MultiLLMChatCompletion:
        """Wait for the reply to a `submit`ted request, then forget it: `create` in two steps.

        Between the steps the caller holds `future.request_id`, the request's AMQP `message_id`,
        which is the `request_id` of its log records (`multillm logs show REQUEST_ID`).

        Raises:
            RpcError: (a subclass per code) the pipeline answered with an RpcStatus.
            RequestTimeout: no reply within `timeout` seconds (default: the client's).
        """
        timeout = self.timeout if timeout is None else timeout
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise RequestTimeout(f"no reply to request {future.request_id} within {timeout:g}s") from None
        finally:
            self.forget(future)

    def submit(self, request: V1CreateMultiLLMChatCompletionRequest, *, timeout: float | None = None) -> PendingReply:
        """Publish `request` and return at once; the future completes with the reply.

        Its result raises like `create`, except that the caller applies the
        timeout (`future.result(timeout)`) and then calls `forget(future)`; or
        `wait(future)` does both.

        Raises:
            BrokerUnavailable, Unavailable: as `create`, when the publish fails.
        """
        timeout = self.timeout if timeout is None else timeout
        future = PendingReply(new_request_id())
        with self._lock:
            self._pending[future.request_id] = future
        try:
            self._publisher.publish(request, reply_to=self.reply_queue, request_id=future.request_id, timeout=timeout)
        except BaseException:
            self.forget(future)
            raise
        return future

    def stream(self, request: V1CreateMultiLLMChatCompletionRequest, *, timeout: float | None = None) -> ReplyStream:
        """Publish `request`, asking for the primary's answer as it is written; iterate what this returns.

        Example:
            stream = client.stream(make_request(["mock/a", "mock/b"], "Hello"))
            for delta in stream:
                print(delta.text, end="", flush=True)  # delta.restart: clear what was shown first
            reply = stream.reply  # the final reply, as `create` returns it

        Raises:
            BrokerUnavailable, Unavailable: as `create`, when the publish fails. The iteration
            raises what `create` raises when waiting (see `ReplyStream`).
        """
        timeout = self.timeout if timeout is None else timeout
        stream = ReplyStream(new_request_id(), timeout, self.forget_stream)
        self.open_stream(request, stream.request_id, stream.put, timeout)
        return stream

    def open_stream(
        self,
        request: V1CreateMultiLLMChatCompletionRequest,
        request_id: str,
        put: Callable[[Item], None],
        timeout: float,
    ) -> None:
        """Publish `request` as a streamed one; `put` gets its chunks, then its final reply (on the
        listener's thread), or the reason it never will (`close`). For `stream` and `AsyncClient.stream`.

        Raises:
            BrokerUnavailable, Unavailable: as `create`, when the publish fails.
        """
        with self._lock:
            self._streams[request_id] = put
        try:
            self._publisher.publish(
                request, reply_to=self.reply_queue, request_id=request_id, timeout=timeout, stream=True
            )
        except BaseException:
            self.forget_stream(request_id)
            raise

    def forget_stream(self, request_id: str) -> None:
        """Stop listening for a streamed request's chunks and reply (the caller left its stream)."""
        with self._lock:
            self._streams.pop(request_id, None)

    def publish(
        self,
        request: V1CreateMultiLLMChatCompletionRequest,
        *,
        reply_to: str,
        request_id: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> str:
        """Publish without waiting; the reply goes to the named durable queue `reply_to`.

        `stream`: chunks of the primary's answer go there first (read them with
        `ReplyQueue.consume(..., on_chunk=...)`).

        The queue is declared (durable, quorum), once per client, so that no reply is lost
        before its consumer starts; read it with `ReplyQueue(broker_url, reply_to)`. A name
        the broker keeps for itself (`amq.`, direct reply-to among them) is not declared.

        Returns:
            the request id, which the reply carries as its correlation id.

        Raises:
            BrokerUnavailable: the broker could not declare the queue or did not confirm the publish.
            Unavailable: no queue is bound to the requests exchange.
        """
        if not reply_to.startswith(contract.RESERVED_QUEUE_PREFIX):
            self._publisher.declare_once(contract.named_reply_queue(reply_to))
        return self._publisher.publish(
            request, reply_to=reply_to, request_id=request_id, timeout=timeout, stream=stream
        )

    def score(
        self,
        log_id: str,
        name: str,
        *,
        value: float | None = None,
        label: str | None = None,
        comment: str | None = None,
        source: str | None = None,
        request_id: str | None = None,
        score_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Score the record `log_id` (a reply's `id` is its primary's) and wait for the broker's
        confirm; the primary workers write it to `llm_scores`. Returns the score's id.

        User feedback: `name="feedback"`, `label="up"` or `"down"` (its value, 1 or 0, follows).
        Without `score_id`, the id is derived from `log_id`, `name` and `source`: scoring the
        same record under the same name and source again keeps the first score.

        Raises:
            ValueError: the score cannot be stored (an empty or overlong name, a value that is
                not a finite number, neither value nor label); the message names the problem.
            BrokerUnavailable: the broker did not confirm the publish, even after reconnecting.
            Unavailable: no queue is bound to the scores exchange.
        """
        score = checked_score(
            V1Score(
                log_id=log_id,
                name=name,
                value=value,
                label=label,
                comment=comment,
                source=source,
                request_id=request_id,
                score_id=score_id,
            )
        )
        return self._publisher.publish_score(score, timeout=self.timeout if timeout is None else timeout)

    def _on_chunk(self, request_id: str | None, chunk: V1ChatCompletionChunk) -> None:
        with self._lock:
            put = self._streams.get(request_id or "")
        if put is None:
            log.debug("chunk.unmatched", correlation_id=request_id)
            return
        put(chunk)

    def _on_reply(self, reply: Reply) -> None:
        with self._lock:
            put = self._streams.pop(reply.request_id or "", None)
            future = self._pending.pop(reply.request_id or "", None)
        if put is not None:
            put(reply)
            return
        if future is None:
            # A duplicate (at-least-once) or a reply to a call that timed out.
            log.debug("reply.unmatched", correlation_id=reply.request_id)
            return
        try:
            future.set_result(reply.result())
        except MultiLLMError as exc:
            _settle(future, exc)
        except InvalidStateError:
            pass  # the caller cancelled it: nobody is waiting

    def forget(self, future: PendingReply) -> None:
        """Stop waiting for a submitted request's reply (after a timeout)."""
        with self._lock:
            self._pending.pop(future.request_id, None)

    def close(self) -> None:
        """Stop the reply listener and close every connection; calls still waiting fail."""
        self._listener.stop()
        self._publisher.close()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            streams, self._streams = dict(self._streams), {}
        for future in pending:
            _settle(future, MultiLLMError(f"the client was closed before request {future.request_id} was answered"))
        for request_id, put in streams.items():
            put(MultiLLMError(f"the client was closed before request {request_id} was answered"))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _settle(future: PendingReply, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled by its caller
        future.set_exception(error)


__all__ = ["DEFAULT_TIMEOUT", "Client", "PendingReply"]

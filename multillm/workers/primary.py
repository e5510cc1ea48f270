"""The primary worker's part of a request's life: decode, fan out, call, record, reply.

`on_delivery` decodes and validates the request and returns `Work` whose
`publish_first` are the fan-out copies, so that the other models run at the same time
as the primary. The work calls the primary model while the copies' confirms come in,
writes its record, then reads those confirms (a copy that no queue took becomes an
error record) and returns the reply to publish. The consumer publishes it (confirmed)
and only then acks the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import msgspec
import pika
import structlog

from multillm import contract
from multillm.config import StreamConfig
from multillm.errors import Code, InvalidArgument, ProviderError
from multillm.metrics import Published
from multillm.providers import Providers
from multillm.records import log_id_for
from multillm.schemas import (
    ErrorInfo,
    FanOutCopy,
    RpcStatus,
    V1ChatCompletion,
    V1CreateMultiLLMChatCompletionRequest,
    V1MultiLLMChatCompletion,
    encode,
)
from multillm.workers.incoming import deadline_of, read_request, request_id_of, wants_stream
from multillm.workers.messages import Decision, Delivery, Outgoing, Running, Settlement, Work, dead_letter
from multillm.workers.model_run import ModelRun, ModelRunner, now_ms
from multillm.workers.streaming import ChunkStream

log = structlog.get_logger(__name__)


class PrimaryHandler:
    queue = contract.requests_queue()

    def __init__(
        self, providers: Providers, runner: ModelRunner, max_body_bytes: int, stream: StreamConfig | None = None
    ) -> None:
        self._providers = providers
        self._runner = runner
        self._max_body_bytes = max_body_bytes
        self._stream = stream or StreamConfig()

    # --- the life of a request ------------------------------------------------

    def on_delivery(self, delivery: Delivery) -> Decision:
        props = delivery.properties
        request_id = request_id_of(delivery)
        bound = log.bind(request_id=request_id)
        try:
            request = self._parse(delivery)
        except InvalidArgument as exc:
            bound.warning("request.invalid", error=exc.message, reply_to=props.reply_to)
            return self._refuse(delivery, request_id, exc.code, exc.message)
        bound = bound.bind(log_id=log_id_for(request_id, request.display_model), model=request.primary.name)
        deadline = deadline_of(props, now_ms())
        if deadline is not None and now_ms() > deadline:
            bound.warning("request.expired", deadline_ms=deadline)
            status = RpcStatus(
                code=Code.DEADLINE_EXCEEDED, message="the request's deadline passed before it was served"
            )
            return Settlement(self._reply(delivery, request_id, status))
        others = [index for index in range(len(request.models)) if index != request.display_model]
        # One line a request on the hot path: debug.
        bound.debug("request.accepted", models=request.model_names())
        return Work(
            partial(self._answer, delivery, request, request_id, others, deadline),
            publish_first=[_fanout(request, request_id, index, deadline, delivery.redelivered) for index in others],
        )

    async def _answer(
        self,
        delivery: Delivery,
        request: V1CreateMultiLLMChatCompletionRequest,
        request_id: str,
        others: list[int],
        deadline: int | None,
        running: Running,
    ) -> Settlement:
        chunks = self._chunk_stream(delivery, request, request_id, running)
        run = await self._runner.run(
            request,
            request_id,
            request.display_model,
            deadline,
            maybe_done=delivery.redelivered,
            listener=chunks,
            called=running.called,
        )
        if chunks is not None:
            chunks.close()  # before the reply, on the same channel: the caller gets every chunk first
        # The copies' confirms came in while the primary model answered. A lost connection
        # fails this wait (the request is redelivered).
        unrouted = [index for index, taken in zip(others, await running.taken, strict=True) if not taken]
        owed = await self._record_unrouted(delivery, request, request_id, unrouted)
        reply = self._reply(delivery, request_id, _reply_body(request, run))
        return Settlement([*reply, *owed, *run.owed(delivery, self.queue.name)])

    def _chunk_stream(
        self,
        delivery: Delivery,
        request: V1CreateMultiLLMChatCompletionRequest,
        request_id: str,
        running: Running,
    ) -> ChunkStream | None:
        """Where the primary's answer streams to, when the request asked for it and has a reply queue."""
        props = delivery.properties
        if not props.reply_to or not wants_stream(props):
            return None
        log_id = log_id_for(request_id, request.display_model)
        return ChunkStream(running.send, props.reply_to, props.correlation_id or request_id, log_id, self._stream)

    async def _record_unrouted(
        self,
        delivery: Delivery,
        request: V1CreateMultiLLMChatCompletionRequest,
        request_id: str,
        unrouted: list[int],
    ) -> list[Outgoing]:
        """An error record for each model whose copy no queue took, and what those records owe (`ModelRun.owed`)."""
        if unrouted:
            log.warning(
                "request.unrouted",
                request_id=request_id,
                model=request.primary.name,
                models=[request.models[i].name for i in unrouted],
            )
        owed: list[Outgoing] = []
        for index in unrouted:
            name = request.models[index].name
            error = ProviderError(
                Code.UNAVAILABLE,
                f"no queue took the fan-out copy for model {name!r} (none is bound, or it is full):"
                f" start `multillm worker model --model {name}`",
            )
            failed = await self._runner.record_failure(request, request_id, index, error)
            owed += failed.owed(delivery, self.queue.name)
        return owed

    # --- settled for good -------------------------------------------------------

    def on_give_up(self, delivery: Delivery) -> Decision:
        reason = f"gave up after {delivery.delivery_count + 1} deliveries: the request kept failing or killing workers"
        return self.give_up(delivery, reason)

    def on_error(self, delivery: Delivery, error: Exception, taken: Sequence[bool] | None) -> Decision:
        # The model workers record the models whose copies a queue took; the others are ours.
        reason = f"internal error while serving the request: {type(error).__name__}"
        return self.give_up(delivery, reason, contract.REASON_INTERNAL_ERROR, copies_taken=taken)

    def give_up(
        self,
        delivery: Delivery,
        reason: str,
        why: str = contract.REASON_GIVEN_UP,
        *,
        copies_taken: Sequence[bool] | None = (),
    ) -> Decision:
        """Settle the request for good: an error record (13) for its primary, the reply 13, a masked dead letter.

        `why`: the ErrorInfo reason of the reply. `copies_taken`: whether a queue took each
        fan-out copy this delivery published, so that the models of those not taken get an
        error record too; None: the copies never went out; empty: this delivery published
        none, and they went out on an earlier one.
        """
        request_id = request_id_of(delivery)
        try:
            request = self._parse(delivery)
        except InvalidArgument as exc:
            return self._refuse(delivery, request_id, exc.code, exc.message)
        others = [index for index in range(len(request.models)) if index != request.display_model]
        if copies_taken is None and not delivery.redelivered:
            not_taken = others
        elif copies_taken:
            not_taken = [index for index, ok in zip(others, copies_taken, strict=True) if not ok]
        else:
            # Published on an earlier delivery (a redelivered request published them before it
            # got this far): their model workers write those records; ours could only race them.
            not_taken = []

        async def record_and_refuse(_: Running) -> Settlement:
            error = ProviderError(Code.INTERNAL, reason)
            run = await self._runner.record_failure(request, request_id, request.display_model, error)
            owed = run.owed(delivery, self.queue.name)
            for index in not_taken:
                failed = await self._runner.record_failure(request, request_id, index, error)
                owed += failed.owed(delivery, self.queue.name)
            detail = ErrorInfo(reason=why, metadata={contract.DETAIL_LOG_ID: run.record.log_id})
            refusal = self._refuse(delivery, request_id, Code.INTERNAL, reason, detail)
            refusal.publishes += owed
            return refusal

        return Work(record_and_refuse)

    def expire(self, delivery: Delivery, reason: str) -> Settlement:
        """A request the broker expired in its queue: the reply 4, a masked dead letter, no model and no record."""
        log.warning("request.expired", request_id=request_id_of(delivery), reason=reason)
        return self._refuse(delivery, request_id_of(delivery), Code.DEADLINE_EXCEEDED, reason)

    def _refuse(
        self, delivery: Delivery, request_id: str, code: int, message: str, detail: ErrorInfo | None = None
    ) -> Settlement:
        """An RpcStatus reply, and the request in the dead-letter queue with its keys masked."""
        status = RpcStatus(code=code, message=message, details=[detail] if detail else [])
        dead = dead_letter(delivery, self.queue.name, message, code)
        return Settlement([*self._reply(delivery, request_id, status), dead])

    def _parse(self, delivery: Delivery) -> V1CreateMultiLLMChatCompletionRequest:
        return read_request(delivery, self._providers, self._max_body_bytes)

    def _reply(
        self, delivery: Delivery, request_id: str, reply: V1MultiLLMChatCompletion | RpcStatus
    ) -> list[Outgoing]:
        props = delivery.properties
        if not props.reply_to:
            return []
        kind = contract.TYPE_ERROR if isinstance(reply, RpcStatus) else contract.TYPE_REPLY
        # A named reply queue that is gone makes the reply unroutable: it is dead-lettered. Direct
        # reply-to cannot say so (the broker returns every mandatory publish to it): a caller
        # whose connection is gone loses its reply, as direct reply-to is made to.
        direct = contract.is_direct_reply_to(props.reply_to)
        return [
            Outgoing(
                exchange="",
                routing_key=props.reply_to,
                body=encode(reply),
                properties=pika.BasicProperties(
                    content_type=contract.CONTENT_TYPE,
                    delivery_mode=contract.PERSISTENT,
                    correlation_id=props.correlation_id or request_id,
                    message_id=request_id,
                    type=kind,
                ),
                kind=Published.REPLY,
                code=reply.code if isinstance(reply, RpcStatus) else 0,
                dead_letter_reason=None if direct else "reply could not be delivered",
                mandatory=not direct,
            )
        ]


def _reply_body(request: V1CreateMultiLLMChatCompletionRequest, run: ModelRun) -> V1MultiLLMChatCompletion | RpcStatus:
    outcome = run.outcome
    if isinstance(outcome, ProviderError):
        return RpcStatus(
            code=outcome.code,
            message=outcome.message,
            details=[
                ErrorInfo(
                    reason=contract.REASON_MODEL_CALL_FAILED,
                    metadata={
                        contract.DETAIL_LOG_ID: run.record.log_id if run.stored else "",
                        contract.DETAIL_ATTEMPTS: str(outcome.attempts),
                    },
                )
            ],
        )
    log_id = run.record.log_id if run.stored else ""
    return V1MultiLLMChatCompletion(
        id=log_id,
        primary_external_id=outcome.external_id,
        model_names=request.model_names(),
        display_model=request.display_model,
        tracing=request.tracing,
        mode=request.stored_mode,
        completion=V1ChatCompletion(
            id=log_id,
            external_id=outcome.external_id,
            model=request.primary.name,
            choices=outcome.choices,
            usage=outcome.usage,
        ),
    )


def _fanout(
    request: V1CreateMultiLLMChatCompletionRequest, request_id: str, index: int, deadline: int | None, redelivered: bool
) -> Outgoing:
    # Each copy keeps only its own model's api key.
    models = [m if i == index else m.without_key() for i, m in enumerate(request.models)]
    copy = FanOutCopy(
        request_id=request_id,
        model_index=index,
        request=msgspec.structs.replace(request, models=models),
        deadline_ms=deadline,
        redelivered=redelivered,
    )
    return Outgoing(
        exchange=contract.MODEL_EXCHANGE,
        routing_key=request.models[index].name,
        body=encode(copy),
        properties=pika.BasicProperties(
            content_type=contract.CONTENT_TYPE,
            delivery_mode=contract.PERSISTENT,
            # The record's log id: a short, fixed-length shortstr whatever the request id is.
            message_id=log_id_for(request_id, index),
            type=contract.TYPE_FANOUT,
        ),
        kind=Published.FANOUT,
        about=request.models[index].name,
    )

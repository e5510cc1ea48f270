"""Calling one model of a request and writing its record: the part both workers share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pika
import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars

from multillm import contract
from multillm.errors import Code
from multillm.metrics import Published, WorkerMetrics
from multillm.pricing import Prices
from multillm.providers import JsonSchemaFormat, ModelResult, ProviderError, Providers, StreamListener
from multillm.records import build_record, log_id_for, outcome_of, utc_now
from multillm.schemas import LLMLogRecord, V1CreateMultiLLMChatCompletionRequest, encode
from multillm.workers.messages import Delivery, Outgoing, dead_letter
from multillm.workers.storage import RECORD_DUPLICATE, Storage

log = structlog.get_logger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class ModelRun:
    record: LLMLogRecord
    outcome: ModelResult | ProviderError
    # The record is in the sink, written now or by an earlier delivery of the same message.
    stored: bool

    def owed(self, delivery: Delivery, queue: str) -> list[Outgoing]:
        """What the record owes before the delivery is acked: once stored, the record for the records'
        stream (the judge reads it there); else the record as a dead letter, so that it is not lost.

        A record found stored by a redelivery goes to the stream again: the first delivery may have
        died before its publish was confirmed, and the stream's readers are idempotent.
        """
        if self.stored:
            return [stream_record(self.record)]
        reason = "the sink did not take this record; replay it from here"
        record = encode(self.record)
        # Kept whole: a cut record could not be replayed (its input was within max_body_bytes).
        return [dead_letter(delivery, queue, reason, Code.UNAVAILABLE, record, contract.TYPE_RECORD, keep_whole=True)]


def stream_record(record: LLMLogRecord) -> Outgoing:
    """`record` for `multillm.records`: not mandatory, since no queue may be bound to it."""
    return Outgoing(
        exchange=contract.RECORD_EXCHANGE,
        routing_key="",
        body=encode(record),
        properties=pika.BasicProperties(
            content_type=contract.CONTENT_TYPE,
            delivery_mode=contract.PERSISTENT,
            message_id=record.log_id,
            correlation_id=record.request_id,
            type=contract.TYPE_RECORD,
        ),
        kind=Published.RECORD,
        about=record.model_name,
        mandatory=False,
    )


class ModelRunner:
    """Calls a model through the providers and records the outcome in `storage`; on the worker's event loop."""

    def __init__(
        self,
        providers: Providers,
        storage: Storage,
        metrics: WorkerMetrics | None = None,
        prices: Prices | None = None,
    ) -> None:
        self._providers = providers
        self._prices = prices
        self.storage = storage
        self._metrics = metrics or WorkerMetrics()

    async def run(
        self,
        request: V1CreateMultiLLMChatCompletionRequest,
        request_id: str,
        model_index: int,
        deadline_ms: int | None = None,
        *,
        maybe_done: bool = False,
        response_format: JsonSchemaFormat | None = None,
        listener: StreamListener | None = None,
        called: Callable[[], None] = lambda: None,
    ) -> ModelRun:
        """Call `request.models[model_index]` unless the deadline has passed, then record it.

        With `maybe_done` (the message was delivered before), a record already in the
        sink is the answer: the model is not paid for twice, and the reply agrees with
        the record. `response_format`: the answer's JSON schema, if one is wanted (the judge's).
        `listener`: stream the call, telling it each try's start and each text delta.
        `called()` comes once no call is left to make, before the record is written (`Running.called`).
        """
        if maybe_done and (existing := await self.storage.existing_record(request_id, model_index)) is not None:
            called()
            log.info("record.reused", request_id=request_id, log_id=existing.log_id, model=existing.model_name)
            return ModelRun(existing, outcome_of(existing), stored=True)
        created_at = utc_now()
        model = request.models[model_index]
        outcome: ModelResult | ProviderError
        if deadline_ms is not None and now_ms() > deadline_ms:
            outcome = ProviderError(Code.DEADLINE_EXCEEDED, "the request's deadline passed before the model was called")
        else:
            self._metrics.call_started(model.name)
            # Bound for the call so that the providers' lines (retries) name the request too; each
            # task has its own context. Not `bound_contextvars`: its generator costs twice as much.
            log_id = log_id_for(request_id, model_index)
            tokens = bind_contextvars(request_id=request_id, log_id=log_id, model=model.name)
            try:
                if listener is None:
                    outcome = await self._providers.complete(model, request.messages, response_format)
                else:
                    outcome = await self._providers.stream(model, request.messages, listener)
            except ProviderError as exc:
                outcome = exc
            finally:
                reset_contextvars(**tokens)
                self._metrics.call_ended(model.name)
        called()
        # Let the delivery that takes the slot begin its call before this one's bookkeeping:
        # when a wave of calls returns at once, the next wave then starts one response
        # apart, not one record and reply apart.
        await asyncio.sleep(0)
        return await self._record(request, request_id, model_index, outcome, created_at)

    async def record_failure(
        self,
        request: V1CreateMultiLLMChatCompletionRequest,
        request_id: str,
        model_index: int,
        error: ProviderError,
    ) -> ModelRun:
        """Record a model that was never called (e.g. no worker queue took its copy)."""
        return await self._record(request, request_id, model_index, error, utc_now())

    async def _record(
        self,
        request: V1CreateMultiLLMChatCompletionRequest,
        request_id: str,
        model_index: int,
        outcome: ModelResult | ProviderError,
        created_at: str,
    ) -> ModelRun:
        record = build_record(request, request_id, model_index, outcome, created_at, utc_now(), self._prices)
        self._metrics.recorded(record)
        bound = log.bind(request_id=request_id, log_id=record.log_id, model=record.model_name)
        written = await self.storage.store_record(record, bound)
        if written is None:
            return ModelRun(record, outcome, stored=False)
        # A record written ok is the normal case, one a message: debug, to keep it off a busy worker's output.
        emit = bound.info if not written else bound.debug if record.status == "ok" else bound.warning
        emit(
            "record.written" if written else RECORD_DUPLICATE,
            status=record.status,
            error_code=record.error_code,
            attempts=record.attempts,
            latency_ms=record.latency_ms,
        )
        return ModelRun(record, outcome, stored=True)


__all__ = ["ModelRun", "ModelRunner", "now_ms"]

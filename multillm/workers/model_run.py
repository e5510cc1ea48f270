"""Calling one model of a request and writing its record: the part both workers share."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final

import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars

from multillm import contract
from multillm.config import SINK_RETRY_WAITS
from multillm.errors import Code, describe
from multillm.metrics import WorkerMetrics
from multillm.pricing import Prices
from multillm.providers import ModelResult, ProviderError, Providers
from multillm.records import build_record, log_id_for, outcome_of, utc_now
from multillm.schemas import LLMLogRecord, V1CreateMultiLLMChatCompletionRequest, encode
from multillm.sinks import Sink
from multillm.workers.group_commit import GroupCommit
from multillm.workers.messages import Delivery, Outgoing, dead_letter

log = structlog.get_logger(__name__)

# Logged (at info) each time the sink refused a record already stored under its log id:
# `multillm chaos` counts these lines.
RECORD_DUPLICATE: Final = "record.duplicate"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class ModelRun:
    record: LLMLogRecord
    outcome: ModelResult | ProviderError
    # The record is in the sink, written now or by an earlier delivery of the same message.
    stored: bool

    def unstored_record(self, delivery: Delivery, queue: str) -> list[Outgoing]:
        """The record as a dead letter when the sink would not take it, so that it is not lost."""
        if self.stored:
            return []
        reason = "the sink did not take this record; replay it from here"
        record = encode(self.record)
        # Kept whole: a cut record could not be replayed (its input was within max_body_bytes).
        return [dead_letter(delivery, queue, reason, Code.UNAVAILABLE, record, contract.TYPE_RECORD, keep_whole=True)]


class ModelRunner:
    """Calls a model through the providers and records the outcome in the sink.

    Runs on the worker's event loop; the sink's blocking reads and writes go to
    `sink_threads`, writes batched by `GroupCommit`.
    """

    def __init__(
        self,
        providers: Providers,
        sink: Sink,
        metrics: WorkerMetrics | None = None,
        sink_threads: Executor | None = None,
        prices: Prices | None = None,
    ) -> None:
        self._providers = providers
        self._prices = prices
        self._sink = sink
        self._metrics = metrics or WorkerMetrics()
        self._sink_threads = sink_threads
        self._writer = GroupCommit(sink, sink_threads, self._metrics.sink_written)

    async def run(
        self,
        request: V1CreateMultiLLMChatCompletionRequest,
        request_id: str,
        model_index: int,
        deadline_ms: int | None = None,
        *,
        maybe_done: bool = False,
    ) -> ModelRun:
        """Call `request.models[model_index]` unless the deadline has passed, then record it.

        With `maybe_done` (the message was delivered before), a record already in the
        sink is the answer: the model is not paid for twice, and the reply agrees with
        the record.
        """
        if maybe_done and (existing := await self._lookup(request_id, model_index)) is not None:
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
                outcome = await self._providers.complete(model, request.messages)
            except ProviderError as exc:
                outcome = exc
            finally:
                reset_contextvars(**tokens)
                self._metrics.call_ended(model.name)
        return await self._record(request, request_id, model_index, outcome, created_at)

    def close(self, timeout: float) -> bool:
        """Close the sink and its threads, once no call is left that could write a record; False if
        a sink thread was still busy after `timeout` seconds (a database that stopped answering),
        and both were left as they are.
        """
        closer = threading.Thread(target=self._close_now, name="sink-close", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.error("sink.close_abandoned", waited_seconds=timeout)
            return False
        return True

    def _close_now(self) -> None:
        try:
            if self._sink_threads is not None:
                self._sink_threads.shutdown(wait=True, cancel_futures=True)
            self._sink.close()
        except Exception as exc:  # the records are written or dead-lettered by now: nothing is lost
            log.warning("sink.close_failed", error=describe(exc))

    async def _lookup(self, request_id: str, model_index: int) -> LLMLogRecord | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._sink_threads, self._existing, request_id, model_index)

    def _existing(self, request_id: str, model_index: int) -> LLMLogRecord | None:
        try:
            records = self._sink.records(request_id)
        except Exception as exc:  # the sink is down: calling again is the safe side
            log.warning(
                "record.lookup_failed",
                request_id=request_id,
                log_id=log_id_for(request_id, model_index),
                error=describe(exc),
            )
            return None
        return next((r for r in records if r.model_index == model_index), None)

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
        for wait in (*SINK_RETRY_WAITS, None):
            try:
                written = await self._writer.write(record)
                break
            except Exception as exc:
                bound.error("record.write_failed", error=describe(exc), retry_in=wait)
                if wait is None:
                    return ModelRun(record, outcome, stored=False)
                await asyncio.sleep(wait)
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

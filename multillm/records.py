"""Identity and content of log records and scores: pure functions, shared by both workers.

Identities are derived, never drawn at random, so that a redelivered message
produces the same `log_id` and `span_id` again and the sink's idempotent write
keeps exactly one record per model per request.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Final

from multillm import contract
from multillm.pricing import Prices, TokenUsage
from multillm.providers import ModelResult, ProviderError
from multillm.schemas import (
    FEEDBACK,
    FEEDBACK_VALUES,
    LLMLogRecord,
    LLMScore,
    V1CreateMultiLLMChatCompletionRequest,
    V1Score,
    V1Tracing,
    V1Usage,
)

_NAMESPACE: Final = contract.ID_NAMESPACE


def request_id_for(message_id: str | None, correlation_id: str | None, body: bytes) -> str:
    """The request's id: its `message_id`, or, for a producer that sets none, one derived from
    the correlation id and body, so that a redelivery still maps to the same id."""
    if message_id:
        return message_id
    digest = hashlib.sha256((correlation_id or "").encode() + b"\0" + body).hexdigest()
    return str(uuid.uuid5(_NAMESPACE, digest))


@functools.lru_cache(maxsize=4096)  # asked for three times per model call (logging, record, copy)
def log_id_for(request_id: str, model_index: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{request_id}/{model_index}"))


def stored_score(score: V1Score, created_at: str) -> LLMScore:
    """The row of `score`, its id derived when it came without one, and feedback given its value."""
    value = score.value
    if value is None and score.name == FEEDBACK and score.label is not None:
        value = FEEDBACK_VALUES[score.label]  # `score_problem` let only up or down through
    return LLMScore(
        score_id=score.id,
        log_id=score.log_id,
        request_id=score.request_id,
        name=score.name,
        value=value,
        label=score.label,
        comment=score.comment,
        source=score.source,
        created_at=created_at,
    )


def _hex(seed: str, length: int) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:length]


def record_tracing(tracing: V1Tracing | None, request_id: str, log_id: str) -> V1Tracing:
    """Each model's record is a new span under the request's span, in the request's trace.

    A request without a trace id gets one derived from its id, so its sibling
    records can still be found by `trace_id`.
    """
    tracing = tracing or V1Tracing()
    return V1Tracing(
        session_id=tracing.session_id,
        trace_id=tracing.trace_id or _hex("trace/" + request_id, 32),
        span_id=_hex("span/" + log_id, 16),
        parent_span_id=tracing.span_id,
    )


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_record(
    request: V1CreateMultiLLMChatCompletionRequest,
    request_id: str,
    model_index: int,
    outcome: ModelResult | ProviderError,
    created_at: str,
    completed_at: str,
    prices: Prices | None = None,
) -> LLMLogRecord:
    """The record of one model's call, priced by `prices` when given. The api key is not a field:
    it cannot leak here."""
    model = request.models[model_index]
    log_id = log_id_for(request_id, model_index)
    tracing = record_tracing(request.tracing, request_id, log_id)
    record = LLMLogRecord(
        log_id=log_id,
        request_id=request_id,
        model_name=model.name,
        model_index=model_index,
        is_primary=model_index == request.display_model,
        messages=request.messages,
        temperature=model.temperature,
        max_tokens=model.max_tokens,
        attempts=outcome.attempts,
        latency_ms=round(outcome.latency_ms, 3),
        session_id=tracing.session_id,
        trace_id=tracing.trace_id,
        span_id=tracing.span_id,
        parent_span_id=tracing.parent_span_id,
        user_id=request.user_id,
        mode=request.stored_mode,
        log_attributes=request.log_attributes,
        created_at=created_at,
        completed_at=completed_at,
    )
    if isinstance(outcome, ProviderError):
        record.status = "error"
        record.error_code = outcome.code
        record.error_message = outcome.message
    else:
        record.external_id = outcome.external_id
        record.output = outcome.choices
        record.prompt_tokens = outcome.usage.prompt_tokens
        record.completion_tokens = outcome.usage.completion_tokens
        record.total_tokens = outcome.usage.total_tokens
        record.cached_tokens = outcome.cached_tokens
        record.reasoning_tokens = outcome.reasoning_tokens
        if outcome.time_to_first_token_ms is not None:
            record.time_to_first_token_ms = round(outcome.time_to_first_token_ms, 3)
        if prices is not None:
            usage = TokenUsage(
                prompt_tokens=outcome.usage.prompt_tokens,
                completion_tokens=outcome.usage.completion_tokens,
                cached_tokens=outcome.cached_tokens or 0,
            )
            record.cost_usd = prices.cost_usd(model.name, usage)
    return record


def outcome_of(record: LLMLogRecord) -> ModelResult | ProviderError:
    """The outcome a record was built from, so that a redelivered message answers as the first did."""
    latency_ms = record.latency_ms or 0.0
    if record.status == "error":
        return ProviderError(
            record.error_code or 13, record.error_message or "", attempts=record.attempts, latency_ms=latency_ms
        )
    return ModelResult(
        external_id=record.external_id or "",
        model=record.model_name,
        choices=record.output or [],
        usage=V1Usage(
            prompt_tokens=record.prompt_tokens or 0,
            completion_tokens=record.completion_tokens or 0,
            total_tokens=record.total_tokens or 0,
        ),
        attempts=record.attempts,
        latency_ms=latency_ms,
        cached_tokens=record.cached_tokens,
        reasoning_tokens=record.reasoning_tokens,
        time_to_first_token_ms=record.time_to_first_token_ms,
    )


def attribute(record: LLMLogRecord, key: str) -> str | None:
    """The value of the record's log attribute `key`, or None."""
    return next((a.value for a in record.log_attributes if a.key == key), None)


def origin_of(record: LLMLogRecord) -> str:
    """The request whose input the record answered: the one it replays (`replayOf`), or its own."""
    return attribute(record, contract.ATTR_REPLAY_OF) or record.request_id


def is_judge_record(record: LLMLogRecord) -> bool:
    """Whether the record is one of the judge's own calls (it carries `judgeOf`)."""
    return attribute(record, contract.ATTR_JUDGE_OF) is not None

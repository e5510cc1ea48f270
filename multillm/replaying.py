"""Logged traffic sent again to other models (`multillm replay`): which copies, under which ids.

A replay is a fan-out copy, as the primary worker sends, straight to a model's queue, so
that the model's workers call it and write its record as for any request. Each (original
request, model) pair is a request of its own, whose id is derived from the two: replaying
the same request to the same model again yields the same request and log ids, and the
sink keeps one record. Its models are the original's primary (never called: a replay has no
primary, and each record is non-primary) and the model replayed to, at index 1. Every record
carries `replayOf`, the original request's id, which `logs compare` and the judge follow.

Only the logged input goes: the messages, the temperature and max tokens the original's
primary was called with, its user, mode, session and log attributes. A record holds no api
key, so the model workers use their configured keys.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Final

from multillm import contract
from multillm.records import is_judge_record, origin_of
from multillm.schemas import (
    FanOutCopy,
    LLMLogRecord,
    LogAttribute,
    V1CreateMultiLLMChatCompletionRequest,
    V1Model,
    V1Tracing,
)

# The index of the model replayed to in a replay's request (0 is the original's primary, not called).
REPLAYED_INDEX: Final = 1


def replay_request_id(origin: str, model: str) -> str:
    """The id of the replay of request `origin` to `model`: the same pair, the same id."""
    return str(uuid.uuid5(contract.ID_NAMESPACE, json.dumps(["replay", origin, model])))


def logged_inputs(records: list[LLMLogRecord]) -> list[LLMLogRecord]:
    """One record per original request among `records`, to take the input from: its primary's when
    selected, else the first selected; oldest first. The judge's own calls are not traffic."""
    chosen: dict[str, LLMLogRecord] = {}
    for record in records:
        if is_judge_record(record):
            continue
        origin = origin_of(record)
        current = chosen.get(origin)
        is_original_primary = record.is_primary and record.request_id == origin
        if current is None or (is_original_primary and not current.is_primary):
            chosen[origin] = record
    return sorted(chosen.values(), key=lambda r: (r.created_at, r.request_id))


@dataclass(frozen=True, slots=True)
class Replay:
    """One copy to send: the input of request `origin` to `model`."""

    origin: str
    model: str
    copy: FanOutCopy

    @property
    def request_id(self) -> str:
        return self.copy.request_id


def replay(source: LLMLogRecord, model: str) -> Replay:
    """The copy that sends `source`'s input to `model`."""
    origin = origin_of(source)
    attributes = [a for a in source.log_attributes if a.key != contract.ATTR_REPLAY_OF]
    request = V1CreateMultiLLMChatCompletionRequest(
        models=[
            V1Model(name=source.model_name, temperature=source.temperature, max_tokens=source.max_tokens),
            V1Model(name=model, temperature=source.temperature, max_tokens=source.max_tokens),
        ],
        messages=source.messages,
        display_model=0,
        tracing=V1Tracing(session_id=source.session_id) if source.session_id else None,
        user_id=source.user_id,
        mode=source.mode,
        log_attributes=[*attributes, LogAttribute(key=contract.ATTR_REPLAY_OF, value=origin)],
    )
    copy = FanOutCopy(
        request_id=replay_request_id(origin, model),
        model_index=REPLAYED_INDEX,
        request=request,
        # The worker looks in the sink before it calls: a pair replayed before is not paid for twice.
        redelivered=True,
    )
    return Replay(origin, model, copy)

"""What the judge asks a model, and what its answers mean: pure functions (workers/judge.py makes the calls).

The judge compares a non-primary answer (the candidate) with the primary's answer to the
same conversation. It asks twice, once with each answer shown first, because judges favour
a position; a verdict that flips with the order counts as a tie. The two asks are requests
of their own, one model each, whose records carry `judgeOf` (the judged record) so that the
judge's calls are in the books, priced like any other.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Final, Literal

import msgspec

from multillm import contract
from multillm.providers import JsonSchemaFormat
from multillm.records import stored_score, utc_now
from multillm.schemas import (
    MAX_SCORE_COMMENT_CHARS,
    ChatMessage,
    LLMLogRecord,
    LLMScore,
    LogAttribute,
    V1CreateMultiLLMChatCompletionRequest,
    V1Model,
    V1Score,
    V1Tracing,
)

# The judge's instructions (the system message), unless `[judge] prompt` in multillm.toml says otherwise.
DEFAULT_PROMPT: Final = (
    "You are an impartial judge of answers given by AI assistants. You are shown a conversation and two "
    "answers to its last message, <answer_a> and <answer_b>. Decide which answer serves the user better: "
    "correct, helpful, complete and to the point. Do not let the order of the answers, their length or "
    'their style sway you. Answer in JSON: `winner` is "A", "B" or "tie", `reason` one or two '
    "sentences."
)

# OpenAI's structured outputs: the judge must answer in this shape.
VERDICT_FORMAT: Final = JsonSchemaFormat(
    name="verdict",
    schema={
        "type": "object",
        "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]}, "reason": {"type": "string"}},
        "required": ["winner", "reason"],
        "additionalProperties": False,
    },
)

Order = Literal["primary-first", "candidate-first"]
ORDERS: Final[tuple[Order, Order]] = ("primary-first", "candidate-first")
ATTR_ORDER: Final = "judgeOrder"
Label = Literal["win", "tie", "loss"]


class Verdict(msgspec.Struct, frozen=True):
    winner: Literal["A", "B", "tie"]
    reason: str = ""


_verdict_decoder: Final = msgspec.json.Decoder(Verdict)


def read_verdict(text: str) -> Verdict:
    """The judge's answer, read.

    Raises:
        ValueError: it is not the JSON that `VERDICT_FORMAT` asks for (named in the message).
    """
    try:
        return _verdict_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"the judge's answer is not a verdict ({exc}): {text[:200]!r}") from None


def answer_text(record: LLMLogRecord) -> str:
    """The text of a record's first choice ("" when it has none)."""
    if not record.output:
        return ""
    return record.output[0].message.content or ""


def _conversation(messages: list[ChatMessage]) -> str:
    return "\n".join(f"{m.role}: {m.content or ''}" for m in messages)


def judge_request_id(scored_log_id: str, judge_model: str, order: Order) -> str:
    """The id of one of the judge's two asks about a record: the same ask after a redelivery, or by
    another judge process, has the same id, so the sink keeps one record of it."""
    return str(uuid.uuid5(contract.ID_NAMESPACE, json.dumps(["judge", scored_log_id, judge_model, order])))


def judge_request(
    judge_model: str, prompt: str, scored: LLMLogRecord, primary: LLMLogRecord, order: Order
) -> V1CreateMultiLLMChatCompletionRequest:
    """The judge's ask about `scored` against `primary`, with the answers in `order`; in the trace of
    the scored record, under its span."""
    first, second = (primary, scored) if order == "primary-first" else (scored, primary)
    shown = (
        f"<conversation>\n{_conversation(scored.messages)}\n</conversation>\n"
        f"<answer_a>{answer_text(first)}</answer_a>\n<answer_b>{answer_text(second)}</answer_b>"
    )
    return V1CreateMultiLLMChatCompletionRequest(
        models=[V1Model(name=judge_model, temperature=0.0)],
        messages=[ChatMessage(role="system", content=prompt), ChatMessage(role="user", content=shown)],
        tracing=V1Tracing(session_id=scored.session_id, trace_id=scored.trace_id, span_id=scored.span_id),
        mode=scored.mode,
        log_attributes=[
            LogAttribute(key=contract.ATTR_JUDGE_OF, value=scored.log_id),
            LogAttribute(key=ATTR_ORDER, value=order),
        ],
    )


def _label(verdict: Verdict, order: Order) -> Label:
    """The candidate's result in one ask."""
    if verdict.winner == "tie":
        return "tie"
    candidate = "B" if order == "primary-first" else "A"
    return "win" if verdict.winner == candidate else "loss"


def combine(primary_first: Verdict, candidate_first: Verdict) -> tuple[Label, str]:
    """The candidate's label from both asks, and the comment: the asks agree, or it is a tie (a
    verdict that follows the order says nothing about the answers)."""
    labels = (_label(primary_first, "primary-first"), _label(candidate_first, "candidate-first"))
    label: Label = labels[0] if labels[0] == labels[1] else "tie"
    note = ""
    if labels[0] != labels[1]:
        note = f"The verdict changed with the order ({labels[0]}, then {labels[1]}): a tie. "
    comment = f"{note}Primary first: {primary_first.reason} Candidate first: {candidate_first.reason}"
    return label, comment[:MAX_SCORE_COMMENT_CHARS]


def sampled(request_id: str, rate: float) -> bool:
    """Whether the request is judged at `rate` (0 to 1): the same answer for the same id, in every
    judge process, so that a request is judged whole or not at all."""
    if rate >= 1:
        return True
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def judge_source(judge_model: str) -> str:
    return contract.JUDGE_SOURCE_PREFIX + judge_model


def score_id(scored: LLMLogRecord, judge_model: str) -> str:
    """The id of the judge's score of `scored`: one per record and judge model."""
    source = judge_source(judge_model)
    return V1Score(log_id=scored.log_id, name=contract.JUDGE_SCORE_NAME, label="tie", source=source).id


def judge_score(scored: LLMLogRecord, judge_model: str, label: Label, comment: str) -> LLMScore:
    score = V1Score(
        log_id=scored.log_id,
        request_id=scored.request_id,
        name=contract.JUDGE_SCORE_NAME,
        label=label,
        value=contract.JUDGE_LABEL_VALUES[label],
        comment=comment,
        source=judge_source(judge_model),
    )
    return stored_score(score, utc_now())

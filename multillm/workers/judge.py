"""The judge worker's part: records from `multillm.judge` in, `judge.vs_primary` scores out.

The primary and model workers publish every record they write to `multillm.records`
(fanout) before they ack; `multillm.judge` is bound to it. A non-primary `ok` record is
judged against its request's primary `ok` record (for a replayed request: the primary of
the request it replays), whichever of the two arrives second: the one that arrives first
finds its partner missing from the sink and leaves the pair to the other. As each record
is published only after it is written, at least one of the two finds both.

Exactly one score per judged record, under redelivery and with several judge processes:
the score's id is derived from the record and the judge model, and the sink keeps the
first score under an id; a pair already scored is not judged again, and each of the
judge's two asks has a derived request id too, so a second process that races the first
reuses the first's call once it is recorded (`ModelRunner.run`'s `maybe_done`).

A pair the judge cannot judge (its call failed after the retries, or its answer is no
verdict) keeps its error records and goes to `multillm.dead` with the reason: the stream
record, for a person to look at. Nothing is retried for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

import msgspec
import structlog

from multillm import contract
from multillm.errors import Code, ProviderError
from multillm.judging import (
    ORDERS,
    VERDICT_FORMAT,
    Order,
    Verdict,
    answer_text,
    combine,
    judge_request,
    judge_request_id,
    judge_score,
    read_verdict,
    sampled,
    score_id,
)
from multillm.records import is_judge_record, origin_of
from multillm.schemas import LLMLogRecord, decode_record
from multillm.sinks import RecordFilter
from multillm.workers.messages import Decision, Delivery, Outgoing, Running, Settlement, Work, dead_letter, too_large
from multillm.workers.model_run import ModelRun, ModelRunner
from multillm.workers.scores import unstored_score

log = structlog.get_logger(__name__)

Pair = tuple[LLMLogRecord, LLMLogRecord]  # the record judged, and the primary's it is judged against


class JudgeHandler:
    queue = contract.judge_queue()

    def __init__(self, judge_model: str, runner: ModelRunner, sample: float, prompt: str, max_body_bytes: int) -> None:
        self.judge_model = judge_model
        self._runner = runner
        self._storage = runner.storage
        self._sample = sample
        self._prompt = prompt
        self._max_body_bytes = max_body_bytes

    def on_delivery(self, delivery: Delivery) -> Decision:
        try:
            if reason := too_large(delivery.body, self._max_body_bytes):
                raise ValueError(reason)
            record = decode_record(delivery.body)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            reason = f"invalid record: {exc}"
            log.warning("judge.invalid", error=reason, message_id=delivery.properties.message_id)
            return self._dead(delivery, reason, Code.INVALID_ARGUMENT)
        if record.status != "ok" or is_judge_record(record):
            return Settlement()  # nothing to judge: an error, or the judge's own call
        return Work(partial(self._judge_pairs, delivery, record))

    async def _judge_pairs(self, delivery: Delivery, record: LLMLogRecord, _: Running) -> Settlement:
        owed: list[Outgoing] = []
        for scored, primary in await self._pairs(record):
            owed += await self._judge(delivery, scored, primary)
        return Settlement(owed)

    async def _pairs(self, record: LLMLogRecord) -> list[Pair]:
        """The pairs `record` completes: with its primary, or, for a primary, with each judged record there is."""
        if record.is_primary:
            if not sampled(record.request_id, self._sample):
                return []
            siblings = await self._storage.records(RecordFilter(request_id=record.request_id))
            replays = await self._storage.records(RecordFilter(attributes={contract.ATTR_REPLAY_OF: record.request_id}))
            judged = [r for r in [*siblings, *replays] if not r.is_primary and r.status == "ok"]
            return [(scored, record) for scored in judged if not is_judge_record(scored)]
        origin = origin_of(record)
        if not sampled(origin, self._sample):
            return []
        records = await self._storage.records(RecordFilter(request_id=origin))
        primary = next((r for r in records if r.is_primary), None)
        if primary is None or primary.status != "ok":
            return []  # not (yet) there: its own arrival judges this pair; an error: nothing to judge against
        return [(record, primary)]

    async def _judge(self, delivery: Delivery, scored: LLMLogRecord, primary: LLMLogRecord) -> list[Outgoing]:
        bound = log.bind(log_id=scored.log_id, request_id=scored.request_id, judge=self.judge_model)
        if score_id(scored, self.judge_model) in await self._storage.score_ids(
            RecordFilter(request_id=scored.request_id)
        ):
            bound.debug("judge.already_scored")
            return []
        runs = await asyncio.gather(*(self._ask(scored, primary, order) for order in ORDERS))
        owed = [message for run in runs for message in run.owed(delivery, self.queue.name)]
        try:
            primary_first, candidate_first = (_verdict(run) for run in runs)
        except (ProviderError, ValueError) as exc:
            code = exc.code if isinstance(exc, ProviderError) else Code.INTERNAL
            reason = f"the judge could not judge record {scored.log_id}: {exc}"
            bound.warning("judge.failed", error=str(exc))
            return [*owed, dead_letter(delivery, self.queue.name, reason, code)]
        label, comment = combine(primary_first, candidate_first)
        score = judge_score(scored, self.judge_model, label, comment)
        written = await self._storage.store_score(score, bound)
        if written is None:
            return [*owed, unstored_score(delivery, self.queue.name, score)]
        bound.info("judge.scored" if written else "score.duplicate", label=label, model=scored.model_name)
        return owed

    async def _ask(self, scored: LLMLogRecord, primary: LLMLogRecord, order: Order) -> ModelRun:
        request = judge_request(self.judge_model, self._prompt, scored, primary, order)
        request_id = judge_request_id(scored.log_id, self.judge_model, order)
        # `maybe_done`: another judge process, or an earlier delivery, may have asked already.
        return await self._runner.run(request, request_id, 0, maybe_done=True, response_format=VERDICT_FORMAT)

    def on_give_up(self, delivery: Delivery) -> Decision:
        reason = f"gave up after {delivery.delivery_count + 1} deliveries: judging kept failing or killing workers"
        return self._dead(delivery, reason, Code.INTERNAL)

    def on_error(self, delivery: Delivery, error: Exception, taken: Sequence[bool] | None) -> Decision:
        return self._dead(delivery, f"internal error while judging: {type(error).__name__}", Code.INTERNAL)

    def _dead(self, delivery: Delivery, reason: str, code: int) -> Settlement:
        return Settlement([dead_letter(delivery, self.queue.name, reason, code)])


def _verdict(run: ModelRun) -> Verdict:
    """The verdict of one ask.

    Raises:
        ProviderError: the ask failed (its record is the error).
        ValueError: its answer is no verdict.
    """
    if isinstance(run.outcome, ProviderError):
        raise run.outcome
    return read_verdict(answer_text(run.record))

"""The scores consumer: `V1Score` messages from `multillm.scores`, written to `llm_scores`.

The primary worker consumes this queue beside `multillm.requests`: every deployment runs
at least one primary worker, and it has the sink already, so scores need no process of
their own and scale with the primaries. A score costs no model call, only a row in a
group commit, so it holds a call slot for milliseconds.

A score is written whether or not the record it scores is in the sink yet (the fan-out
copy of a slow model may still be on its way); readers join the two on `log_id`. Writing
is idempotent on `score_id` (the first score under an id is kept), so a redelivery makes
no second row. A score that cannot be stored (an undecodable body, an empty or overlong
name, a value that is not a finite number, neither value nor label) goes to
`multillm.dead` masked, with the reason; one the sink would not take goes there as the
`LLMScore` row, for `multillm logs replay-dead`.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import structlog

from multillm import contract
from multillm.errors import Code
from multillm.records import stored_score, utc_now
from multillm.schemas import LLMScore, decode_score, encode
from multillm.workers.messages import Decision, Delivery, Outgoing, Running, Settlement, Work, dead_letter, too_large
from multillm.workers.storage import Storage

log = structlog.get_logger(__name__)


class ScoreHandler:
    queue = contract.scores_queue()

    def __init__(self, storage: Storage, max_body_bytes: int) -> None:
        self._storage = storage
        self._max_body_bytes = max_body_bytes

    def on_delivery(self, delivery: Delivery) -> Decision:
        try:
            if reason := too_large(delivery.body, self._max_body_bytes):
                raise ValueError(reason)
            score = stored_score(decode_score(delivery.body), utc_now())
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            reason = f"invalid score: {exc}"
            log.warning("score.invalid", error=reason, message_id=delivery.properties.message_id)
            return self._dead(delivery, reason, Code.INVALID_ARGUMENT)

        async def store(_: Running) -> Settlement:
            bound = log.bind(score_id=score.score_id, log_id=score.log_id, name=score.name)
            written = await self._storage.store_score(score, bound)
            if written is None:
                return self._unstored(delivery, score)
            # A duplicate is rare (a redelivery, a score sent twice): info, as for records.
            (bound.debug if written else bound.info)("score.written" if written else "score.duplicate")
            return Settlement()

        return Work(store)

    def on_give_up(self, delivery: Delivery) -> Decision:
        reason = f"gave up after {delivery.delivery_count + 1} deliveries: the score kept failing or killing workers"
        return self._dead(delivery, reason, Code.INTERNAL)

    def on_error(self, delivery: Delivery, error: Exception, taken: Sequence[bool] | None) -> Decision:
        return self._dead(delivery, f"internal error while storing the score: {type(error).__name__}", Code.INTERNAL)

    def _dead(self, delivery: Delivery, reason: str, code: int) -> Settlement:
        return Settlement([dead_letter(delivery, self.queue.name, reason, code)])

    def _unstored(self, delivery: Delivery, score: LLMScore) -> Settlement:
        return Settlement([unstored_score(delivery, self.queue.name, score)])


def unstored_score(delivery: Delivery, queue: str, score: LLMScore) -> Outgoing:
    """A score the sink would not take, as its row in the dead letters, for `multillm logs replay-dead`."""
    reason = "the sink did not take this score; replay it from here"
    return dead_letter(delivery, queue, reason, Code.UNAVAILABLE, encode(score), contract.TYPE_STORED_SCORE)

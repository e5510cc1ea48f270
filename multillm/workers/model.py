"""The per-model worker's part: take a fan-out copy, call that model, write its record.

The ack waits for the record: when the sink cannot take it (after a few tries),
the record itself goes to the dead letters, and the copy is acked, so the model
is not paid for again.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import msgspec
import structlog

from multillm import contract
from multillm.errors import Code, ProviderError
from multillm.schemas import FanOutCopy, decode_fanout
from multillm.workers.messages import Decision, Delivery, Outgoing, Running, Settlement, Work, dead_letter, too_large
from multillm.workers.model_run import ModelRunner

log = structlog.get_logger(__name__)


class ModelHandler:
    def __init__(self, model_name: str, runner: ModelRunner, max_body_bytes: int) -> None:
        self.model_name = model_name
        self.queue = contract.model_queue_spec(model_name)
        self._runner = runner
        self._max_body_bytes = max_body_bytes

    def on_delivery(self, delivery: Delivery) -> Decision:
        copy = self._decode(delivery)
        if isinstance(copy, Settlement):
            return copy
        bound = log.bind(request_id=copy.request_id, log_id=delivery.properties.message_id, model=copy.model.name)
        if copy.model.name != self.model_name:
            bound.warning("copy.misrouted", expected=self.model_name)
        bound.debug("copy.accepted", index=copy.model_index)
        return Work(partial(self._call_and_record, delivery, copy))

    async def _call_and_record(self, delivery: Delivery, copy: FanOutCopy, running: Running) -> Settlement:
        maybe_done = copy.redelivered or delivery.redelivered
        run = await self._runner.run(
            copy.request,
            copy.request_id,
            copy.model_index,
            copy.deadline_ms,
            maybe_done=maybe_done,
            called=running.called,
        )
        return Settlement(run.owed(delivery, self.queue.name))

    def on_give_up(self, delivery: Delivery) -> Decision:
        reason = f"gave up after {delivery.delivery_count + 1} deliveries: the copy kept failing or killing workers"
        return self.give_up(delivery, reason, Code.INTERNAL)

    def on_error(self, delivery: Delivery, error: Exception, taken: Sequence[bool] | None) -> Decision:
        # An error record unless the model's record was written before the bug (the sink keeps the first).
        return self.give_up(delivery, f"internal error while serving the copy: {type(error).__name__}", Code.INTERNAL)

    def give_up(self, delivery: Delivery, reason: str, code: int) -> Decision:
        """Settle the copy for good: an error record (`code`) for its model, and a masked dead letter."""
        copy = self._decode(delivery)
        if isinstance(copy, Settlement):
            return copy

        async def record_and_dead_letter(_: Running) -> Settlement:
            error = ProviderError(code, reason)
            run = await self._runner.record_failure(copy.request, copy.request_id, copy.model_index, error)
            return Settlement([self._dead_letter(delivery, reason, code), *run.owed(delivery, self.queue.name)])

        return Work(record_and_dead_letter)

    def _decode(self, delivery: Delivery) -> FanOutCopy | Settlement:
        """The copy, or the settlement of an undecodable one: to the dead-letter queue."""
        try:
            if reason := too_large(delivery.body, self._max_body_bytes):
                raise ValueError(reason)
            return decode_fanout(delivery.body)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            reason = f"invalid fan-out copy: {exc}"
            # A copy's message_id is its record's log id (see primary._fanout).
            log.warning("copy.invalid", error=reason, log_id=delivery.properties.message_id, model=self.model_name)
            return Settlement([self._dead_letter(delivery, reason, Code.INVALID_ARGUMENT)])

    def _dead_letter(self, delivery: Delivery, reason: str, code: int) -> Outgoing:
        return dead_letter(delivery, self.queue.name, reason, code)

"""What the broker dead-lettered on its own: answered, recorded, and passed on to `multillm.dead` masked.

The work queues dead-letter to `multillm.triage` (see contract.py), not straight to
`multillm.dead`: the broker copies a message as it is, api keys and all, and answers
nobody. The broker does so when a request's AMQP `expiration` passes in its queue
(`expired`), when a message reached the delivery limit without the worker settling it
first (`delivery_limit`: the worker was killed at its fifth delivery too, or a policy
lowered the limit), or when another consumer rejected it without requeueing (`rejected`).

The primary worker consumes this queue beside `multillm.requests` and settles each
message as the worker of the queue it left would have: an expired request gets
`RpcStatus` 4 and calls no model; a request given up on gets what `on_give_up` gives
(an error record, the reply 13); a fan-out copy gets its error record (4 when it
expired, 13 otherwise). Each ends in `multillm.dead` masked, with the broker's reason in
`x-multillm-error`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pika
import structlog

from multillm import contract
from multillm.errors import Code
from multillm.workers.messages import Decision, Delivery, Settlement, dead_letter
from multillm.workers.model import ModelHandler
from multillm.workers.model_run import ModelRunner
from multillm.workers.primary import PrimaryHandler

log = structlog.get_logger(__name__)

EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class BrokerDeath:
    """Why and from where the broker dead-lettered a message (its latest `x-death` entry)."""

    reason: str
    queue: str

    def describe(self) -> str:
        return f"dead-lettered by the broker from {self.queue} (reason {self.reason!r})"


def broker_death(props: pika.BasicProperties) -> BrokerDeath | None:
    """The broker's latest dead-lettering of this message, or None if it never dead-lettered it."""
    deaths = (props.headers or {}).get(contract.HEADER_DEATH)
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return None
    reason, queue = deaths[0].get("reason"), deaths[0].get("queue")
    if not isinstance(reason, str) or not isinstance(queue, str):
        return None
    return BrokerDeath(reason, queue)


class TriageHandler:
    queue = contract.triage_queue()

    def __init__(self, primary: PrimaryHandler, runner: ModelRunner, max_body_bytes: int) -> None:
        self._primary = primary
        self._runner = runner
        self._max_body_bytes = max_body_bytes

    def on_delivery(self, delivery: Delivery) -> Decision:
        death = broker_death(delivery.properties)
        headers = delivery.properties.headers or {}
        if death is None and contract.HEADER_ERROR in headers:
            # A dead letter that a worker of an earlier version made and published to the exchange,
            # which now feeds this queue: on into `multillm.dead` with its reason, code and source,
            # built (masked, cut) as every dead letter is.
            code = headers.get(contract.HEADER_ERROR_CODE)
            passed_on = dead_letter(
                delivery,
                str(headers.get(contract.HEADER_SOURCE_QUEUE) or self.queue.name),
                str(headers[contract.HEADER_ERROR]),
                code if isinstance(code, int) and not isinstance(code, bool) else Code.INTERNAL,
            )
            return Settlement([passed_on])
        if death is None:
            reason = (
                f"in {self.queue.name} without the broker's {contract.HEADER_DEATH} header: not a broker dead letter"
            )
            log.warning("triage.not_dead_lettered", message_id=delivery.properties.message_id)
            return Settlement([dead_letter(delivery, self.queue.name, reason, Code.INVALID_ARGUMENT)])
        log.warning(
            "triage.dead_lettered", queue=death.queue, reason=death.reason, message_id=delivery.properties.message_id
        )
        if death.queue == contract.REQUEST_QUEUE and death.reason == EXPIRED:
            return self._primary.expire(
                delivery, f"{death.describe()}: its AMQP expiration passed before a worker took it"
            )
        code = Code.DEADLINE_EXCEEDED if death.reason == EXPIRED else Code.INTERNAL
        return self._settle_as_its_worker(delivery, death, death.describe(), code)

    def on_give_up(self, delivery: Delivery) -> Decision:
        # Triaging it keeps failing or killing workers: settle it as its worker would, for good.
        return self._for_good(delivery, "triage kept failing or killing workers")

    def on_error(self, delivery: Delivery, error: Exception, taken: Sequence[bool] | None) -> Decision:
        return self._for_good(delivery, f"internal error while triaging: {type(error).__name__}")

    def _for_good(self, delivery: Delivery, reason: str) -> Decision:
        death = broker_death(delivery.properties)
        if death is None:
            return Settlement([dead_letter(delivery, self.queue.name, reason, Code.INTERNAL)])
        return self._settle_as_its_worker(delivery, death, reason, Code.INTERNAL)

    def _settle_as_its_worker(self, delivery: Delivery, death: BrokerDeath, reason: str, code: int) -> Decision:
        """What the worker of the queue it left gives up with: an error record for its model, a reply
        for a request, and a masked dead letter."""
        if death.queue == contract.REQUEST_QUEUE:
            return self._primary.give_up(delivery, reason)
        if death.queue.startswith(contract.MODEL_QUEUE_PREFIX):
            model = death.queue.removeprefix(contract.MODEL_QUEUE_PREFIX)
            return ModelHandler(model, self._runner, self._max_body_bytes).give_up(delivery, reason, code)
        return Settlement([dead_letter(delivery, death.queue, reason, Code.INTERNAL)])

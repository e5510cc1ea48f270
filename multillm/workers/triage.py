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

from dataclasses import dataclass

import pika
import structlog

from multillm import contract
from multillm.errors import Code
from multillm.workers.messages import Delivery, Io, Settlement, dead_letter
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

    def on_delivery(self, delivery: Delivery, io: Io) -> None:
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
            io.settle(delivery, Settlement([passed_on]))
            return
        if death is None:
            reason = (
                f"in {self.queue.name} without the broker's {contract.HEADER_DEATH} header: not a broker dead letter"
            )
            log.warning("triage.not_dead_lettered", message_id=delivery.properties.message_id)
            io.settle(delivery, Settlement([dead_letter(delivery, self.queue.name, reason, Code.INVALID_ARGUMENT)]))
            return
        reason = death.describe()
        log.warning(
            "triage.dead_lettered", queue=death.queue, reason=death.reason, message_id=delivery.properties.message_id
        )
        if death.queue == contract.REQUEST_QUEUE:
            if death.reason == EXPIRED:
                self._primary.expire(delivery, io, f"{reason}: its AMQP expiration passed before a worker took it")
            else:
                self._primary.give_up(delivery, io, reason)
        elif death.queue.startswith(contract.MODEL_QUEUE_PREFIX):
            code = Code.DEADLINE_EXCEEDED if death.reason == EXPIRED else Code.INTERNAL
            self._model_handler(death.queue).give_up(delivery, io, reason, code)
        else:
            io.settle(delivery, Settlement([dead_letter(delivery, death.queue, reason, Code.INTERNAL)]))

    def on_give_up(self, delivery: Delivery, io: Io) -> None:
        # Triaging it keeps failing or killing workers: pass it on masked, with a reply if it is a request.
        io.settle(delivery, self._settle_for_good(delivery, "triage kept failing or killing workers"))

    def on_error(self, delivery: Delivery, error: Exception) -> Settlement:
        return self._settle_for_good(delivery, f"internal error while triaging: {type(error).__name__}")

    def _settle_for_good(self, delivery: Delivery, reason: str) -> Settlement:
        death = broker_death(delivery.properties)
        if death is not None and death.queue == contract.REQUEST_QUEUE:
            return self._primary.refuse(delivery, Code.INTERNAL, reason)
        source = death.queue if death is not None else self.queue.name
        return Settlement([dead_letter(delivery, source, reason, Code.INTERNAL)])

    def _model_handler(self, queue: str) -> ModelHandler:
        return ModelHandler(queue.removeprefix(contract.MODEL_QUEUE_PREFIX), self._runner, self._max_body_bytes)

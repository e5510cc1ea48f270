"""The names other programs are written against: exchanges, queues, AMQP types, headers.

Every module that touches the broker takes its names from here, so that
../DESIGN.md's contract is spelled in exactly one place. Both the kombu
producers and the pika workers declare topology from `Topology`, which keeps
the queue arguments identical on both sides (RabbitMQ refuses a redeclaration
whose arguments differ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

REQUEST_EXCHANGE: Final = "multillm.requests"
REQUEST_ROUTING_KEY: Final = "multillm.requests"
REQUEST_QUEUE: Final = "multillm.requests"

MODEL_EXCHANGE: Final = "multillm.models"
MODEL_QUEUE_PREFIX: Final = "multillm.model."

DEAD_EXCHANGE: Final = "multillm.dead"
DEAD_QUEUE: Final = "multillm.dead"

DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"

CONTENT_TYPE: Final = "application/json"
PERSISTENT: Final = 2

# AMQP `type` property values.
TYPE_REQUEST: Final = "V1CreateMultiLLMChatCompletionRequest"
TYPE_REPLY: Final = "V1MultiLLMChatCompletion"
TYPE_ERROR: Final = "RpcStatus"
TYPE_FANOUT: Final = "MultiLLMFanOutCopy"

# Headers we add. `x-multillm-deadline` is absolute (epoch ms) because AMQP's
# `expiration` is relative to when the message entered a queue and cannot be
# read back as a point in time by the worker.
HEADER_DEADLINE: Final = "x-multillm-deadline"
HEADER_ERROR: Final = "x-multillm-error"
HEADER_ERROR_CODE: Final = "x-multillm-error-code"
HEADER_SOURCE_QUEUE: Final = "x-multillm-source-queue"


def model_queue(model_name: str) -> str:
    """The queue of the per-model workers of `model_name` (routing key = the name)."""
    return MODEL_QUEUE_PREFIX + model_name


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One durable queue and the exchange and key that feed it."""

    name: str
    exchange: str
    exchange_type: str
    routing_key: str
    arguments: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Topology:
    """Queue arguments shared by every declaration.

    Work queues are quorum queues: replicated, and with `x-delivery-limit` a
    message that keeps killing workers goes to `multillm.dead` instead of
    looping. At-least-once dead-lettering needs `reject-publish` overflow.
    """

    delivery_limit: int = 5

    def _work_arguments(self) -> dict[str, object]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": DEAD_EXCHANGE,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def requests(self) -> QueueSpec:
        return QueueSpec(REQUEST_QUEUE, REQUEST_EXCHANGE, "direct", REQUEST_ROUTING_KEY, self._work_arguments())

    def model(self, model_name: str) -> QueueSpec:
        return QueueSpec(model_queue(model_name), MODEL_EXCHANGE, "direct", model_name, self._work_arguments())

    def dead(self) -> QueueSpec:
        return QueueSpec(DEAD_QUEUE, DEAD_EXCHANGE, "fanout", "", {"x-queue-type": "quorum"})

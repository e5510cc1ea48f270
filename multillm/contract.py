"""The names other programs are written against: exchanges, queues, AMQP types, headers.

Every module that touches the broker takes its names from here, so that
the wire contract (docs/contract.md) is spelled in exactly one place. Both the kombu
producers and the pika workers declare queues from the `QueueSpec`s below, which
keeps the queue arguments identical on both sides (RabbitMQ refuses a
redeclaration whose arguments differ).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Final

REQUEST_EXCHANGE: Final = "multillm.requests"
REQUEST_ROUTING_KEY: Final = "multillm.requests"
REQUEST_QUEUE: Final = "multillm.requests"

MODEL_EXCHANGE: Final = "multillm.models"
MODEL_QUEUE_PREFIX: Final = "multillm.model."

# The work queues' dead-letter exchange (`x-dead-letter-exchange`), as in every version. It
# feeds `multillm.triage`, not `multillm.dead`: the broker's own dead letters (expired,
# delivery limit, rejected) copy the body as sent, api keys and all, and answer nobody. The
# primary worker consumes the triage queue, answers and records what is owed, and puts each
# message into `multillm.dead` masked (workers/triage.py). Workers put the dead letters they
# make straight into `multillm.dead`, through the default exchange.
DEAD_EXCHANGE: Final = "multillm.dead"
DEAD_QUEUE: Final = "multillm.dead"
TRIAGE_QUEUE: Final = "multillm.triage"

# Scores of records (schemas.V1Score), written to `llm_scores` by the primary worker (workers/scores.py).
SCORE_EXCHANGE: Final = "multillm.scores"
SCORE_ROUTING_KEY: Final = "multillm.scores"
SCORE_QUEUE: Final = "multillm.scores"

# Every record a worker writes (schemas.LLMLogRecord, AMQP type `LLMLogRecord`), published after
# the write and before the ack: a stream of records for whoever binds a queue (fanout). The judge
# consumes it through `multillm.judge` (workers/judge.py).
RECORD_EXCHANGE: Final = "multillm.records"
JUDGE_QUEUE: Final = "multillm.judge"

# The judge's score of a non-primary answer against the primary's (docs/contract.md).
JUDGE_SCORE_NAME: Final = "judge.vs_primary"
JUDGE_SOURCE_PREFIX: Final = "judge:"
JUDGE_LABEL_VALUES: Final = {"win": 1.0, "tie": 0.5, "loss": 0.0}
# Log attributes: the request a replayed one repeats (on every record it makes), and the record
# a judge's call judged (on the judge's own records).
ATTR_REPLAY_OF: Final = "replayOf"
ATTR_JUDGE_OF: Final = "judgeOf"

# The UUIDv5 namespace of every id derived rather than drawn: log ids (UUIDv5 of "request id/model
# index"), and the id of a score sent without one (schemas.V1Score.id).
ID_NAMESPACE: Final = uuid.UUID("6f1d8a52-3c1e-4c55-9b55-2f0f3b7b9a10")

# The table of log records in SQL sinks (columns: the fields of schemas.LLMLogRecord).
LOG_TABLE: Final = "llm_logs"
# The table of scores (columns: the fields of schemas.LLMScore).
SCORE_TABLE: Final = "llm_scores"

DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"


def is_direct_reply_to(reply_to: str) -> bool:
    """A caller's direct reply-to name (`amq.rabbitmq.reply-to.…`, as the broker rewrites it).

    The broker hands such a message straight to the caller's channel, through no queue: a
    mandatory publish to it comes back as unroutable even when it was delivered (RabbitMQ's
    direct reply-to guide says so), so replies to it go out not mandatory.
    """
    # With the dot: any other `amq.rabbitmq.reply-to…` name is no caller's, and unroutable like any other.
    return reply_to.startswith(DIRECT_REPLY_TO + ".")


# Queue names the broker keeps for itself (direct reply-to among them): never declared by us.
RESERVED_QUEUE_PREFIX: Final = "amq."
CLIENT_REPLY_QUEUE_PREFIX: Final = "multillm.reply."

CONTENT_TYPE: Final = "application/json"
PERSISTENT: Final = 2

# AMQP `type` property values.
TYPE_REQUEST: Final = "V1CreateMultiLLMChatCompletionRequest"
TYPE_REPLY: Final = "V1MultiLLMChatCompletion"
TYPE_ERROR: Final = "RpcStatus"
TYPE_FANOUT: Final = "MultiLLMFanOutCopy"
# A record the sink would not take, in `multillm.dead` to be replayed.
TYPE_RECORD: Final = "LLMLogRecord"
TYPE_SCORE: Final = "V1Score"
# A piece of the primary's answer, before the final reply, when the request asked for a stream.
TYPE_CHUNK: Final = "V1ChatCompletionChunk"
# A score the sink would not take, in `multillm.dead` as its row (schemas.LLMScore) to be replayed.
TYPE_STORED_SCORE: Final = "LLMScore"

# Headers we add. `x-multillm-deadline` is absolute (epoch ms) because AMQP's
# `expiration` is relative to when the message entered a queue and cannot be
# read back as a point in time by the worker.
HEADER_DEADLINE: Final = "x-multillm-deadline"
HEADER_ERROR: Final = "x-multillm-error"
HEADER_ERROR_CODE: Final = "x-multillm-error-code"
HEADER_SOURCE_QUEUE: Final = "x-multillm-source-queue"
# On a request: `true` asks for the primary's answer as it is written (TYPE_CHUNK messages first).
HEADER_STREAM: Final = "x-multillm-stream"
# `RpcStatus.details`: google.rpc.ErrorInfo entries of our domain, and the keys of their metadata.
ERROR_INFO_TYPE: Final = "type.googleapis.com/google.rpc.ErrorInfo"
ERROR_DOMAIN: Final = "multillm"
DETAIL_LOG_ID: Final = "logId"
DETAIL_ATTEMPTS: Final = "attempts"
# ErrorInfo reasons: the primary model's call failed; the request was given up after too many
# deliveries; a bug in the worker broke the serving of it.
REASON_MODEL_CALL_FAILED: Final = "MODEL_CALL_FAILED"
REASON_GIVEN_UP: Final = "GIVEN_UP"
REASON_INTERNAL_ERROR: Final = "INTERNAL_ERROR"
# Set by quorum queues on a redelivery: how many deliveries came before.
HEADER_DELIVERY_COUNT: Final = "x-delivery-count"
# On every dead letter we write: whether its body was cut to DEAD_LETTER_MAX_BODY_BYTES, and
# the size and sha256 (hex) of the body as it came, to match it with a producer's log.
HEADER_BODY_CUT: Final = "x-multillm-body-cut"
HEADER_ORIGINAL_BYTES: Final = "x-multillm-original-bytes"
HEADER_ORIGINAL_SHA256: Final = "x-multillm-original-sha256"
# Set by the broker on a message it dead-lettered: a list of tables, the latest first, each
# with the `reason` (expired, delivery_limit, rejected, maxlen) and the `queue` it left.
HEADER_DEATH: Final = "x-death"


# Routing keys and queue names are AMQP short strings: at most 255 bytes. A model name is both a
# routing key and, after the prefix, a queue name.
MAX_SHORT_STRING_BYTES: Final = 255
MAX_MODEL_NAME_BYTES: Final = MAX_SHORT_STRING_BYTES - len(MODEL_QUEUE_PREFIX.encode())


def model_queue(model_name: str) -> str:
    """The queue of the per-model workers of `model_name` (routing key = the name)."""
    return MODEL_QUEUE_PREFIX + model_name


# A message that has been delivered this many times without an ack goes to
# `multillm.dead`. Fixed here rather than configurable: producers and workers
# both declare the queues, and RabbitMQ refuses a redeclaration whose arguments
# differ. A policy cannot raise it (the lower value wins) and must not lower it
# below GIVE_UP_AT_DELIVERY_COUNT + 1, or the broker dead-letters first.
DELIVERY_LIMIT: Final = 5
# Workers give up on a message themselves one delivery before the broker would:
# that way the message still gets its reply or record, and its dead letter has
# its api keys masked (the broker's own dead-lettering copies the body as is).
GIVE_UP_AT_DELIVERY_COUNT: Final = DELIVERY_LIMIT - 1

# A dead letter's body (masked) is cut to this many bytes, so that `multillm.dead` grows by
# at most this much per message whatever was sent (a 10 MB request refused as too large).
# Records (`LLMLogRecord`) are kept whole: they are there to be replayed into the sink.
DEAD_LETTER_MAX_BODY_BYTES: Final = 64 * 1024


# Every exchange and its type; all are durable. Declared by whoever connects.
EXCHANGES: Final = {
    REQUEST_EXCHANGE: "direct",
    MODEL_EXCHANGE: "direct",
    DEAD_EXCHANGE: "fanout",
    SCORE_EXCHANGE: "direct",
    RECORD_EXCHANGE: "fanout",
}


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One durable queue and the exchange (one of EXCHANGES, or "" for the default) that feeds it."""

    name: str
    exchange: str
    routing_key: str
    arguments: dict[str, object] = field(default_factory=dict)


def _work_queue_arguments() -> dict[str, object]:
    # Quorum queues are replicated and count deliveries; at-least-once
    # dead-lettering needs `reject-publish` overflow.
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def requests_queue() -> QueueSpec:
    return QueueSpec(REQUEST_QUEUE, REQUEST_EXCHANGE, REQUEST_ROUTING_KEY, _work_queue_arguments())


def model_queue_spec(model_name: str) -> QueueSpec:
    return QueueSpec(model_queue(model_name), MODEL_EXCHANGE, model_name, _work_queue_arguments())


def scores_queue() -> QueueSpec:
    """Dead-lettered like the work queues: a score the worker gives up on is triaged, not lost."""
    return QueueSpec(SCORE_QUEUE, SCORE_EXCHANGE, SCORE_ROUTING_KEY, _work_queue_arguments())


def judge_queue() -> QueueSpec:
    """Every record the workers write; consumed by `multillm worker judge`. Declared by the judge
    only: until one has started, the records' stream goes to no queue."""
    return QueueSpec(JUDGE_QUEUE, RECORD_EXCHANGE, "", _work_queue_arguments())


def triage_queue() -> QueueSpec:
    """Whoever declares a work queue declares this one too: at-least-once dead-lettering
    keeps a message in its work queue until a queue takes its dead letter.

    It dead-letters into `multillm.dead` itself (by the default exchange), which only a
    message that kills the primary worker at every one of its deliveries here would reach,
    unmasked.
    """
    arguments = {
        **_work_queue_arguments(),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": DEAD_QUEUE,
    }
    return QueueSpec(TRIAGE_QUEUE, DEAD_EXCHANGE, "", arguments)


def dead_queue() -> QueueSpec:
    """Fed by the default exchange only (see DEAD_EXCHANGE)."""
    return QueueSpec(DEAD_QUEUE, "", DEAD_QUEUE, {"x-queue-type": "quorum"})


# Bindings that earlier versions made and this one removes wherever it declares (queue, exchange,
# routing key): with it, the broker's dead letters would reach `multillm.dead` unmasked. Removing
# them in place keeps every queue's arguments as they were, so an upgrade needs no queue deleted.
OBSOLETE_BINDINGS: Final = ((DEAD_QUEUE, DEAD_EXCHANGE, ""),)


def named_reply_queue(name: str) -> QueueSpec:
    """A durable reply queue that a service names; fed by the default exchange."""
    return QueueSpec(name, "", name, {"x-queue-type": "quorum"})


def client_reply_queue(unique: str, *, replicated: bool = False) -> QueueSpec:
    """The private reply queue of one `Client`.

    Durable, not exclusive, not auto-delete: it must outlive a dropped
    connection and a broker restart, so that replies arriving meanwhile wait in
    it. `x-expires` removes it once no client has used it for ten minutes.

    `replicated` (the client was given the nodes of a cluster): a quorum queue, so that
    the replies to calls in flight survive the death of the node that holds it, and the
    client reads them from another node. Otherwise a classic queue, which lives on one
    node: cheaper per reply, but a caller whose node dies loses those replies (its calls
    end in `RequestTimeout`). docs/operations.md weighs the two.
    """
    name = CLIENT_REPLY_QUEUE_PREFIX + unique
    arguments: dict[str, object] = {"x-expires": 10 * 60 * 1000}
    if replicated:
        arguments["x-queue-type"] = "quorum"
    return QueueSpec(name, "", name, arguments)

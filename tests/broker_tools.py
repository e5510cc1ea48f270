"""Raw AMQP for tests: publish bytes no client would send, read the dead-letter queue."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import kombu

from multillm import contract
from multillm.producers import Reply, ReplyQueue
from multillm.producers.publishing import connect
from multillm.testbed.rabbitmq import rabbitmqctl, vhost_of


def publish_raw(broker_url: str, body: bytes, reply_to: str | None, **properties: Any) -> None:
    """Publish `body` as a request, exactly as given (confirmed)."""
    with connect(broker_url) as connection:
        producer = kombu.Producer(connection.default_channel)
        producer.publish(
            body,
            exchange=contract.REQUEST_EXCHANGE,
            routing_key=contract.REQUEST_ROUTING_KEY,
            content_type=properties.pop("content_type", contract.CONTENT_TYPE),
            content_encoding=properties.pop("content_encoding", "utf-8"),
            reply_to=reply_to,
            **properties,
        )


@dataclass
class DeadLetter:
    body: bytes
    headers: dict[str, Any]


def read_dead_letters(broker_url: str, count: int, timeout: float = 15.0) -> list[DeadLetter]:
    """Take `count` messages from `multillm.dead` (fewer if the time runs out)."""
    found: list[DeadLetter] = []
    deadline = time.monotonic() + timeout
    with connect(broker_url) as connection:
        queue = kombu.Queue(contract.DEAD_QUEUE, no_declare=True)(connection.default_channel)
        while len(found) < count and time.monotonic() < deadline:
            message = queue.get(no_ack=True)
            if message is None:
                time.sleep(0.05)
                continue
            found.append(DeadLetter(message.body, dict(message.headers or {})))
    return found


def publish_copy(broker_url: str, body: bytes, model_name: str, **properties: Any) -> None:
    """Publish `body` to a model's queue, as the primary's fan-out would."""
    with connect(broker_url) as connection:
        kombu.Producer(connection.default_channel).publish(
            body,
            exchange=contract.MODEL_EXCHANGE,
            routing_key=model_name,
            content_type=contract.CONTENT_TYPE,
            content_encoding="utf-8",
            **properties,
        )


def collect_replies(broker_url: str, queue: str, count: int, idle_timeout: float = 20.0) -> list[Reply]:
    """Read up to `count` replies from a named reply queue; stops after `idle_timeout` s without one."""
    got: list[Reply] = []
    reply_queue = ReplyQueue(broker_url, queue)
    try:
        reply_queue.consume(got.append, limit=count, idle_timeout=idle_timeout)
    finally:
        reply_queue.close()
    return got


def wait_until_settled(broker_url: str, queue: str, timeout: float = 30.0) -> None:
    """Until `queue` holds no message, ready or taken by a consumer (a worker acks a message after its
    work: once none is left, everything it led to is done). Asked of rabbitmqctl, which counts both."""
    vhost = vhost_of(broker_url)
    deadline = time.monotonic() + timeout
    while True:
        listed = rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
        counts = dict(line.rsplit("\t", 1) for line in listed.splitlines() if "\t" in line)
        if int(counts.get(queue, "0")) == 0:
            return
        assert time.monotonic() < deadline, f"{queue} still holds {counts[queue]} messages"
        time.sleep(0.1)

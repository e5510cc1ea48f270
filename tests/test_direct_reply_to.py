"""A raw pika caller on RabbitMQ's direct reply-to (no reply queue at all) gets its reply."""

from __future__ import annotations

import pika

from multillm import contract
from multillm.producers import make_request
from multillm.schemas import decode_reply, encode
from tests.conftest import StartWorker


def test_a_caller_on_direct_reply_to_gets_its_reply(start_worker: StartWorker, broker_url: str) -> None:
    start_worker("primary")
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        replies: list[tuple[pika.BasicProperties, bytes]] = []
        # Direct reply-to: consume the pseudo-queue, with auto-ack, before publishing on the same channel.
        channel.basic_consume(
            contract.DIRECT_REPLY_TO, lambda ch, method, props, body: replies.append((props, body)), auto_ack=True
        )
        channel.basic_publish(
            contract.REQUEST_EXCHANGE,
            contract.REQUEST_ROUTING_KEY,
            encode(make_request(["mock/a"], "direct")),
            pika.BasicProperties(
                content_type=contract.CONTENT_TYPE,
                message_id="direct-1",
                correlation_id="corr-direct-1",
                reply_to=contract.DIRECT_REPLY_TO,
            ),
        )
        connection.process_data_events(time_limit=0)
        for _ in range(300):
            if replies:
                break
            connection.process_data_events(time_limit=0.1)
    finally:
        connection.close()

    [(props, body)] = replies
    assert props.type == contract.TYPE_REPLY
    assert props.correlation_id == "corr-direct-1"
    reply = decode_reply(body)
    assert reply.completion.model == "mock/a" and reply.completion.choices

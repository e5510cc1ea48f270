"""A raw pika caller on RabbitMQ's direct reply-to (no reply queue at all) gets its reply, and
nothing else happens: the broker returns every mandatory publish to a direct reply-to name, even
one it delivered, which once put a bogus "reply could not be delivered" dead letter in
`multillm.dead` for every such request."""

from __future__ import annotations

import pika

from multillm import contract
from multillm.producers import make_request
from multillm.schemas import decode_reply, encode
from tests.broker_tools import wait_until_settled
from tests.conftest import StartWorker


def test_a_caller_on_direct_reply_to_gets_its_reply(start_worker: StartWorker, broker_url: str) -> None:
    worker = start_worker("primary")
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
    # Everything the request owed was published before its ack: once it is settled, nothing
    # went to the dead letters and no reply was called unroutable.
    wait_until_settled(broker_url, contract.REQUEST_QUEUE)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        dead = connection.channel().queue_declare(contract.DEAD_QUEUE, passive=True)
    finally:
        connection.close()
    assert dead.method.message_count == 0
    assert "reply.unroutable" not in worker.log_text()


def test_only_the_names_the_broker_gives_direct_reply_to_callers_are_taken_for_them() -> None:
    # The broker rewrites `amq.rabbitmq.reply-to` to `amq.rabbitmq.reply-to.<token>` on delivery.
    assert contract.is_direct_reply_to("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMjM0NTY3OAAAAAAAAAAA")
    # Anything else is a queue's name like any other: published mandatory, dead-lettered if unroutable.
    assert not contract.is_direct_reply_to("amq.rabbitmq.reply-tox")
    assert not contract.is_direct_reply_to("multillm.reply.amq.rabbitmq.reply-to.x")
    assert not contract.is_direct_reply_to("my-replies")

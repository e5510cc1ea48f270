"""Every queue the project declares is durable or exclusive.

RabbitMQ 4.x deprecates transient queues that are not exclusive (the deprecated feature
`transient_nonexcl_queues`): a later release refuses to declare them, which would stop a
client or a worker at its start. So each queue is declared here the way the code declares
it, by the producers and by real worker processes, and read back from the broker.
"""

from __future__ import annotations

from multillm import contract
from multillm.producers import Client, ReplyQueue, make_request
from multillm.testbed.rabbitmq import rabbitmqctl, vhost_of
from tests.conftest import StartWorker

NAMED_REPLIES = "my-service.replies"


def _queues(broker_url: str) -> dict[str, tuple[bool, bool]]:
    """Each queue of the vhost with (durable, exclusive), as the broker reports them."""
    listing = rabbitmqctl(
        "list_queues", "-p", vhost_of(broker_url), "name", "durable", "exclusive", "--no-table-headers"
    )
    queues = {}
    for line in listing.splitlines():
        name, durable, exclusive = line.rsplit("\t", 2)
        queues[name] = (durable == "true", exclusive == "true")
    return queues


def test_every_queue_the_project_declares_is_durable_or_exclusive(
    broker_url: str, start_worker: StartWorker, client: Client
) -> None:
    # The workers declare their topology from contract.py when they connect.
    start_worker("primary")
    start_worker("model", model="mock/b")
    # A named reply queue, as `Client.publish(reply_to=NAME)` and `ReplyQueue` declare it.
    client.publish(make_request(["mock/a"], "hello"), reply_to=NAMED_REPLIES)
    replies = ReplyQueue(broker_url, NAMED_REPLIES)
    try:
        replies.declare()
        queues = _queues(broker_url)
    finally:
        replies.close()

    expected = {
        contract.REQUEST_QUEUE,
        contract.model_queue("mock/b"),
        contract.TRIAGE_QUEUE,
        contract.DEAD_QUEUE,
        client.reply_queue,
        NAMED_REPLIES,
    }
    assert expected <= set(queues), f"not declared: {expected - set(queues)}"
    transient = sorted(name for name, (durable, exclusive) in queues.items() if not (durable or exclusive))
    assert not transient, f"transient, non-exclusive queues: {transient}"

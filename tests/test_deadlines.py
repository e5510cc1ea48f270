"""Deadlines set as AMQP `expiration`, and what the broker dead-letters on its own.

Requests here come from "another producer": raw pika, which sets AMQP properties
(`expiration`, `timestamp`) and rejects messages exactly as a foreign client would.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pika
import pytest

from multillm import contract
from multillm.errors import Code
from multillm.mock_llm import MockControl
from multillm.producers import Client, ReplyQueue, make_request
from multillm.records import log_id_for
from multillm.schemas import FanOutCopy, V1Model, encode
from multillm.sinks import Sink
from tests.broker_tools import collect_replies, read_dead_letters
from tests.conftest import StartWorker, wait_for_records

REPLIES = "test.deadline.replies"
KEY = "sk-deadline-secret-0123456789"


@pytest.fixture(autouse=True)
def topology(broker_url: str) -> None:
    """The queues as a deployment has them: a `Client` declared the request queues, a service its reply queue."""
    Client(broker_url).close()
    queue = ReplyQueue(broker_url, REPLIES)
    queue.declare()
    queue.close()


def _publish(channel: Any, body: bytes, **properties: Any) -> None:
    channel.basic_publish(
        contract.REQUEST_EXCHANGE,
        contract.REQUEST_ROUTING_KEY,
        body,
        pika.BasicProperties(
            content_type=contract.CONTENT_TYPE,
            delivery_mode=contract.PERSISTENT,
            type=contract.TYPE_REQUEST,
            reply_to=REPLIES,
            **properties,
        ),
        mandatory=True,
    )


def _request(*names: str) -> bytes:
    return encode(make_request([V1Model(name=name, api_key=KEY) for name in names], "are we late?"))


def _wait_until_gone(channel: Any, queue: str, timeout: float = 20.0) -> None:
    """Block until `queue` is empty (the broker has expired or dead-lettered what was in it)."""
    deadline = time.monotonic() + timeout
    while channel.queue_declare(queue, passive=True).method.message_count:
        assert time.monotonic() < deadline, f"{queue} never emptied"
        time.sleep(0.05)


def _assert_masked_dead_letter(broker_url: str, reason: str) -> None:
    [dead] = read_dead_letters(broker_url, 1)
    assert KEY.encode() not in dead.body and b'"apiKey":"***"' in dead.body
    assert reason in dead.headers[contract.HEADER_ERROR]
    assert "x-death" not in dead.headers  # a worker wrote it, not the broker


def test_a_request_the_broker_expired_in_the_queue_is_answered_4_and_dead_lettered_masked(
    start_worker: StartWorker, broker_url: str, raw_channel: Any, mock_control: MockControl
) -> None:
    _publish(raw_channel, _request("mock/a", "mock/b"), expiration="1", correlation_id="exp-1", message_id="r-exp-1")

    start_worker("primary")

    [reply] = collect_replies(broker_url, REPLIES, 1, idle_timeout=15)
    assert reply.request_id == "exp-1"
    assert reply.status is not None and reply.status.code == Code.DEADLINE_EXCEEDED
    assert "expired" in reply.status.message
    assert mock_control.calls() == []
    _assert_masked_dead_letter(broker_url, "expired")


def test_a_request_whose_expiration_passes_while_a_worker_holds_it_reaches_no_model(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink, mock_control: MockControl, raw_channel: Any
) -> None:
    mock_control.set_fault("slow", latency_ms=3000)
    start_worker("primary", concurrency=1)
    first = client.publish(make_request(["mock/slow"], "hold the only slot"), reply_to=REPLIES)
    while not mock_control.calls():
        time.sleep(0.02)
    # Prefetched at once (the prefetch is twice the concurrency), so the broker no longer
    # expires it: it waits for the slot in the worker, past its second.
    _publish(raw_channel, _request("mock/held"), expiration="1000", correlation_id="held-1", message_id="r-held")

    replies = {r.request_id: r for r in collect_replies(broker_url, REPLIES, 2, idle_timeout=15)}
    assert replies[first].result().text == "slow says: hold the only slot"
    status = replies["held-1"].status
    assert status is not None and status.code == Code.DEADLINE_EXCEEDED
    [record] = wait_for_records(sink, "r-held", 1)
    assert record.error_code == Code.DEADLINE_EXCEEDED and record.attempts == 0
    assert [c.model for c in mock_control.calls()] == ["slow"]


@pytest.mark.parametrize("header_offset_ms", [None, 300_000, 900_000])
def test_the_copies_carry_the_earliest_of_expiration_and_header_deadline(
    start_worker: StartWorker, broker_url: str, raw_channel: Any, header_offset_ms: int | None
) -> None:
    spec = contract.model_queue_spec("mock/b")
    raw_channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
    raw_channel.queue_bind(spec.name, spec.exchange, routing_key=spec.routing_key)
    sent_at = int(time.time())  # the AMQP timestamp: seconds since the epoch
    headers = {} if header_offset_ms is None else {contract.HEADER_DEADLINE: sent_at * 1000 + header_offset_ms}
    _publish(
        raw_channel,
        _request("mock/a", "mock/b"),
        expiration="600000",
        timestamp=sent_at,
        headers=headers,
        message_id="r-c",
    )
    start_worker("primary")

    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.result().text == "a says: are we late?"
    method, _, body = raw_channel.basic_get(spec.name, auto_ack=True)
    assert method is not None
    copy = msgspec.json.decode(body, type=FanOutCopy)
    assert copy.deadline_ms == sent_at * 1000 + min(600_000, header_offset_ms or 600_000)
    assert copy.request.models[1].api_key == KEY and copy.request.models[0].api_key is None


def test_a_header_deadline_still_expires_a_request_without_expiration(
    start_worker: StartWorker, broker_url: str, raw_channel: Any, mock_control: MockControl
) -> None:
    start_worker("primary")
    past = int(time.time() * 1000) - 1000
    _publish(raw_channel, _request("mock/a"), headers={contract.HEADER_DEADLINE: past}, correlation_id="late-h")
    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.request_id == "late-h"
    assert reply.status is not None and reply.status.code == Code.DEADLINE_EXCEEDED
    assert mock_control.calls() == []


def _reject_until_dead_lettered(channel: Any, queue: str, requeue: bool) -> None:
    """Refuse the one message in `queue` as a foreign consumer would, until the broker dead-letters it."""
    while True:
        method, _, _ = channel.basic_get(queue)
        if method is None:
            _wait_until_gone(channel, queue)
            return
        channel.basic_reject(method.delivery_tag, requeue=requeue)
        if not requeue:
            return


@pytest.mark.parametrize(("requeue", "reason"), [(True, "delivery_limit"), (False, "rejected")])
def test_a_request_the_broker_gave_up_on_gets_13_a_record_and_a_masked_dead_letter(
    start_worker: StartWorker,
    broker_url: str,
    raw_channel: Any,
    sink: Sink,
    mock_control: MockControl,
    requeue: bool,
    reason: str,
) -> None:
    _publish(raw_channel, _request("mock/a"), correlation_id="gone-1", message_id="r-gone")
    _reject_until_dead_lettered(raw_channel, contract.REQUEST_QUEUE, requeue)

    start_worker("primary")

    [reply] = collect_replies(broker_url, REPLIES, 1, idle_timeout=15)
    assert reply.request_id == "gone-1"
    assert reply.status is not None and reply.status.code == Code.INTERNAL
    assert reply.status.log_id == log_id_for("r-gone", 0)
    [record] = wait_for_records(sink, "r-gone", 1)
    assert record.status == "error" and record.error_code == Code.INTERNAL and reason in (record.error_message or "")
    assert mock_control.calls() == []
    _assert_masked_dead_letter(broker_url, reason)


@pytest.mark.parametrize(("how", "reason", "code"), [("reject", "delivery_limit", 13), ("expire", "expired", 4)])
def test_a_copy_the_broker_dead_lettered_gets_its_error_record_and_a_masked_dead_letter(
    start_worker: StartWorker,
    broker_url: str,
    raw_channel: Any,
    sink: Sink,
    mock_control: MockControl,
    how: str,
    reason: str,
    code: int,
) -> None:
    spec = contract.model_queue_spec("mock/b")
    raw_channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
    raw_channel.queue_bind(spec.name, spec.exchange, routing_key=spec.routing_key)
    request = make_request([V1Model(name="mock/a"), V1Model(name="mock/b", api_key=KEY)], "are we late?")
    copy = FanOutCopy(request_id="r-copy", model_index=1, request=request)
    raw_channel.basic_publish(
        contract.MODEL_EXCHANGE,
        "mock/b",
        encode(copy),
        pika.BasicProperties(
            content_type=contract.CONTENT_TYPE,
            delivery_mode=2,
            type=contract.TYPE_FANOUT,
            expiration="1" if how == "expire" else None,
        ),
    )
    if how == "reject":
        _reject_until_dead_lettered(raw_channel, spec.name, requeue=True)

    start_worker("primary")  # the primary worker triages what the broker dead-lettered from any work queue

    [record] = wait_for_records(sink, "r-copy", 1)
    assert (record.model_name, record.status, record.error_code) == ("mock/b", "error", code)
    assert reason in (record.error_message or "") and record.attempts == 0
    assert mock_control.calls() == []
    _assert_masked_dead_letter(broker_url, reason)


def test_an_earlier_versions_topology_is_upgraded_in_place(
    start_worker: StartWorker, broker_url: str, raw_channel: Any, mock_control: MockControl
) -> None:
    # Earlier versions bound `multillm.dead` to the work queues' dead-letter exchange, so the
    # broker's own dead letters landed there unmasked. The queues keep their arguments; the
    # first worker to start moves the binding, and nothing needs deleting.
    raw_channel.queue_bind(contract.DEAD_QUEUE, "multillm.dead", routing_key="")
    assert start_worker("primary").stop() == 0

    _publish(raw_channel, _request("mock/a"), expiration="1", correlation_id="exp-up", message_id="r-exp-up")
    _wait_until_gone(raw_channel, contract.REQUEST_QUEUE)
    start_worker("primary")

    [reply] = collect_replies(broker_url, REPLIES, 1, idle_timeout=15)
    assert reply.status is not None and reply.status.code == Code.DEADLINE_EXCEEDED
    assert mock_control.calls() == []
    _assert_masked_dead_letter(broker_url, "expired")
    assert read_dead_letters(broker_url, 1, timeout=1) == []  # and no unmasked copy beside it


def test_a_dead_letter_of_an_earlier_worker_reaches_multillm_dead_with_its_reason_masked(
    start_worker: StartWorker, broker_url: str, raw_channel: Any
) -> None:
    # A worker of an earlier version, still running during an upgrade, publishes its dead
    # letters to the exchange, which now feeds the triage queue.
    start_worker("primary")
    headers = {
        contract.HEADER_ERROR: "invalid request: from an earlier worker",
        contract.HEADER_ERROR_CODE: 3,
        contract.HEADER_SOURCE_QUEUE: "multillm.requests",
        "x-delivery-count": 2,  # would make a replayed dead letter look exhausted: not kept
    }
    body = b'{"models": [{"name": "mock/a", "apiKey": "sk-old-worker-0123"}]}'
    raw_channel.basic_publish("multillm.dead", "", body, pika.BasicProperties(headers=headers), mandatory=True)
    [dead] = read_dead_letters(broker_url, 1)
    assert b"sk-old-worker" not in dead.body and b'"apiKey": "***"' in dead.body
    assert dead.headers[contract.HEADER_ERROR] == "invalid request: from an earlier worker"
    assert dead.headers[contract.HEADER_ERROR_CODE] == 3
    assert dead.headers[contract.HEADER_SOURCE_QUEUE] == "multillm.requests"
    assert dead.headers.get("x-delivery-count", 0) == 0  # the broker's count of this queue, not the one sent

"""The contract's delivery guarantees (docs/contract.md), proven by causing each fault for real.

Workers are killed with SIGKILL in the middle of a model call, the broker's
application is stopped and started under load, the mock LLM is driven to each
provider fault, and every kind of bad input is sent.
"""

from __future__ import annotations

import signal
import threading
import time

import msgspec
import pytest

from multillm import contract
from multillm.errors import Code
from multillm.mock_llm import MockControl
from multillm.producers import Client, ReplyQueue, make_request
from multillm.records import log_id_for
from multillm.schemas import FanOutCopy, V1Model, encode
from multillm.sinks import Sink
from multillm.testbed.rabbitmq import rabbitmqctl
from tests.broker_tools import collect_replies, publish_copy, publish_raw, read_dead_letters
from tests.conftest import API_KEY_IN_CONFIG, StartWorker, wait_for_log, wait_for_records

REPLIES = "test.replies"


def _wait_for_call(mock_control: MockControl, model: str, count: int = 1, timeout: float = 20.0) -> None:
    """Block until the mock has received `count` calls of `model`: the call is then in flight."""
    deadline = time.monotonic() + timeout
    while sum(1 for c in mock_control.calls() if c.model == model) < count:
        assert time.monotonic() < deadline, f"the mock never saw {count} call(s) of {model}"
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def reply_queue(broker_url: str) -> None:
    """Declared before anything is published with `reply_to=REPLIES`, as a service would."""
    queue = ReplyQueue(broker_url, REPLIES)
    queue.declare()
    queue.close()


# --- workers killed mid-call ------------------------------------------------


def test_primary_killed_mid_call_still_answers_once_with_one_record_per_model(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink, mock_control: MockControl
) -> None:
    mock_control.set_fault("slow", latency_ms=1500)
    victim = start_worker("primary", concurrency=1)
    start_worker("model", model="mock/beta")
    request_id = client.publish(make_request(["mock/slow", "mock/beta"], "survive me"), reply_to=REPLIES)
    _wait_for_call(mock_control, "slow")

    victim.kill()  # SIGKILL while the primary model call is in flight
    start_worker("primary", concurrency=1)

    replies = collect_replies(broker_url, REPLIES, 2, idle_timeout=8)
    assert [r.request_id for r in replies] == [request_id]
    assert replies[0].result().text == "slow says: survive me"
    records = wait_for_records(sink, request_id, 2)
    assert [(r.model_index, r.status) for r in records] == [(0, "ok"), (1, "ok")]
    assert len(sink.records(request_id)) == 2
    calls = [c.model for c in mock_control.calls()]
    # The primary model was called again (its first call died with the worker); beta,
    # whose copy was fanned out again, found its record and was not paid for twice.
    assert calls.count("slow") == 2 and calls.count("beta") == 1


def test_model_worker_killed_mid_call_leaves_exactly_one_record(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink, mock_control: MockControl
) -> None:
    mock_control.set_fault("slowb", latency_ms=1500)
    start_worker("primary")
    victim = start_worker("model", model="mock/slowb", concurrency=1)
    future = client.submit(make_request(["mock/a", "mock/slowb"], "and me"))
    assert future.result(timeout=30).text
    _wait_for_call(mock_control, "slowb")

    victim.kill()
    start_worker("model", model="mock/slowb", concurrency=1)

    records = wait_for_records(sink, future.request_id, 2, timeout=30)
    assert [(r.model_name, r.status) for r in records] == [("mock/a", "ok"), ("mock/slowb", "ok")]
    assert len(sink.records(future.request_id)) == 2
    assert [c.model for c in mock_control.calls()].count("slowb") == 2  # the kill landed mid-call


def test_a_second_signal_exits_at_once_and_the_message_is_redelivered(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink, mock_control: MockControl
) -> None:
    mock_control.set_fault("slow", latency_ms=3000)
    impatient = start_worker("primary", concurrency=1)
    request_id = client.publish(make_request(["mock/slow"], "again"), reply_to=REPLIES)
    _wait_for_call(mock_control, "slow")

    impatient.process.send_signal(signal.SIGTERM)
    wait_for_log(impatient, "worker.stopping")
    impatient.process.send_signal(signal.SIGTERM)
    impatient.killed = True
    assert impatient.process.wait(timeout=2) == 1  # did not wait for the 3 s call

    start_worker("primary", concurrency=1)
    replies = collect_replies(broker_url, REPLIES, 2, idle_timeout=8)
    assert [r.request_id for r in replies] == [request_id]
    assert len(wait_for_records(sink, request_id, 1)) == 1


# --- the broker going away ----------------------------------------------------


@pytest.mark.serial  # it stops the broker every other test uses
def test_broker_restart_under_load_loses_nothing_that_was_confirmed(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink
) -> None:
    start_worker("primary", concurrency=8)
    start_worker("model", model="mock/beta", concurrency=8)
    confirmed: list[str] = []
    failed: list[BaseException] = []

    def publish_many() -> None:
        for i in range(60):
            try:
                confirmed.append(
                    client.publish(make_request(["mock/alpha", "mock/beta"], f"load {i}"), reply_to=REPLIES)
                )
            except Exception as exc:  # a publish the broker never confirmed: the caller knows
                failed.append(exc)
            time.sleep(0.02)

    publisher = threading.Thread(target=publish_many)
    publisher.start()
    while len(confirmed) < 15:
        time.sleep(0.01)
    try:
        rabbitmqctl("stop_app")
        time.sleep(1)
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
    publisher.join(timeout=120)

    assert len(confirmed) + len(failed) == 60 and len(confirmed) >= 15
    replies = collect_replies(broker_url, REPLIES, 10_000, idle_timeout=30)
    answered = {r.request_id for r in replies}
    assert answered >= set(confirmed), f"lost: {set(confirmed) - answered}"
    for request_id in confirmed:
        records = wait_for_records(sink, request_id, 2)
        assert [r.model_index for r in records] == [0, 1], request_id


# --- provider faults --------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "code", "attempts"),
    [
        ({"statuses": [429], "retry_after_ms": 30}, None, 2),
        ({"statuses": [500]}, None, 2),
        ({"statuses": [502]}, None, 2),
        ({"statuses": [503], "retry_after": 0.01}, None, 2),
        ({"drop_connection": True}, None, 2),
        ({"always": 429, "retry_after": 0.01}, Code.RESOURCE_EXHAUSTED, 4),
        ({"always": 503}, Code.UNAVAILABLE, 4),
        ({"always": 400}, Code.INVALID_ARGUMENT, 1),
        ({"always": 401, "echo_auth": True}, Code.UNAUTHENTICATED, 1),
    ],
)
def test_provider_faults_end_in_a_success_or_one_clear_error(
    start_worker: StartWorker,
    client: Client,
    sink: Sink,
    mock_control: MockControl,
    fault: dict[str, object],
    code: int | None,
    attempts: int,
) -> None:
    start_worker("primary")
    mock_control.set_fault("faulty", **fault)  # type: ignore[arg-type]
    future = client.submit(make_request(["mock/faulty"], "hello"))
    if code is None:
        assert future.result(timeout=30).text == "faulty says: hello"
    else:
        with pytest.raises(Exception) as caught:
            future.result(timeout=30)
        assert getattr(caught.value, "code", None) == code
        assert API_KEY_IN_CONFIG not in str(caught.value)
    [record] = wait_for_records(sink, future.request_id, 1)
    assert record.attempts == attempts == len(mock_control.calls())
    assert record.status == ("ok" if code is None else "error") and record.error_code == code
    if code is not None:
        assert record.error_message and API_KEY_IN_CONFIG not in record.error_message


# --- deadlines --------------------------------------------------------------


def test_a_request_past_its_deadline_reaches_no_model(
    start_worker: StartWorker, broker_url: str, mock_control: MockControl
) -> None:
    start_worker("primary")
    body = encode(make_request(["mock/a", "mock/b"], "too late"))
    past = int(time.time() * 1000) - 1000
    publish_raw(broker_url, body, REPLIES, headers={contract.HEADER_DEADLINE: past}, correlation_id="late-1")
    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.status is not None and reply.status.code == Code.DEADLINE_EXCEEDED
    assert reply.request_id == "late-1"
    assert mock_control.calls() == []


def test_a_copy_past_its_deadline_is_recorded_not_called(
    start_worker: StartWorker, broker_url: str, sink: Sink, mock_control: MockControl
) -> None:
    start_worker("model", model="mock/b")
    request = make_request(["mock/a", "mock/b"], "too late")
    copy = FanOutCopy(request_id="r-late", model_index=1, request=request, deadline_ms=int(time.time() * 1000) - 1)
    publish_copy(broker_url, encode(copy), "mock/b")
    [record] = wait_for_records(sink, "r-late", 1)
    assert record.status == "error" and record.error_code == Code.DEADLINE_EXCEEDED and record.attempts == 0
    assert mock_control.calls() == []


def test_create_timeout_raises_and_the_late_request_is_not_served_twice(
    start_worker: StartWorker, client: Client, mock_control: MockControl
) -> None:
    from multillm.errors import RequestTimeout

    mock_control.set_fault("slow", latency_ms=1500)
    start_worker("primary")
    with pytest.raises(RequestTimeout):
        client.create(make_request(["mock/slow"], "hurry"), timeout=0.5)
    # the reply that comes later is dropped by the client, and the next call is unaffected
    assert client.create(make_request(["mock/a"], "next"), timeout=30).text == "a says: next"


# --- bad input --------------------------------------------------------------

VALID = encode(make_request([V1Model(name="mock/a", api_key="sk-in-a-bad-request")], "hi"))


@pytest.mark.parametrize(
    ("body", "properties", "named"),
    [
        (b"not json at all", {}, "malformed"),
        (b'{"models": "mock/a", "messages": []}', {}, "$.models"),
        (b'{"models": [{"name": "mock/a"}], "messages": [{"role": "user", "content": 7}]}', {}, "$.messages[0]"),
        (b'{"models": [{"name": "mock/a"}]}', {}, "messages"),
        (b'{"models": [], "messages": [{"role": "user", "content": "x"}]}', {}, "$.models"),
        (b'{"models": [{"name": "bogus/a"}], "messages": [{"role": "user", "content": "x"}]}', {}, "bogus"),
        (VALID.replace(b'"messages"', b'"displayModel":5,"messages"'), {}, "displayModel"),
        (b'{"models": [{"name": "mock/\xff"}], "messages": []}', {}, "malformed"),
        (VALID, {"content_encoding": "gzip"}, "content_encoding"),
        (VALID, {"content_type": "text/plain"}, "content_type"),
        (VALID, {"content_type": "application/json; charset=latin-1"}, "content_type"),
        (VALID[:-1] + b',"pad":"' + b"x" * (1024 * 1024) + b'"}', {}, "over the limit"),
    ],
)
def test_bad_input_gets_invalid_argument_and_a_dead_letter(
    start_worker: StartWorker, client: Client, broker_url: str, body: bytes, properties: dict[str, str], named: str
) -> None:
    start_worker("primary")
    publish_raw(broker_url, body, REPLIES, correlation_id="bad-1", **properties)
    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.request_id == "bad-1"
    assert reply.status is not None and reply.status.code == Code.INVALID_ARGUMENT
    assert named in reply.status.message
    [dead] = read_dead_letters(broker_url, 1)
    assert named in dead.headers[contract.HEADER_ERROR]
    assert b"sk-in-a-bad-request" not in dead.body
    assert client.create(make_request(["mock/a"], "still serving?"), timeout=30).text


@pytest.mark.parametrize(
    "properties",
    [{"content_type": "application/json; charset=UTF-8"}, {"content_encoding": "binary"}],
)
def test_other_producers_labels_for_utf8_json_are_accepted(
    start_worker: StartWorker, broker_url: str, properties: dict[str, str]
) -> None:
    start_worker("primary")
    publish_raw(broker_url, encode(make_request(["mock/a"], "labels")), REPLIES, **properties)
    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.result().text == "a says: labels"


def test_a_reply_to_that_does_not_exist_is_dead_lettered_not_lost(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink
) -> None:
    start_worker("primary")
    publish_raw(broker_url, encode(make_request(["mock/a"], "to nowhere")), "no.such.queue", message_id="r-nowhere")
    [dead] = read_dead_letters(broker_url, 1)
    assert "no queue named 'no.such.queue'" in dead.headers[contract.HEADER_ERROR]
    assert msgspec.json.decode(dead.body)["primaryExternalId"].startswith("chatcmpl-")
    assert [r.status for r in wait_for_records(sink, "r-nowhere", 1)] == ["ok"]
    assert client.create(make_request(["mock/a"], "still serving?"), timeout=30).text


def test_a_request_that_keeps_killing_workers_is_settled_at_its_fifth_delivery(
    start_worker: StartWorker, broker_url: str, sink: Sink, mock_control: MockControl
) -> None:
    mock_control.set_fault("deadly", latency_ms=5000)
    body = encode(make_request([V1Model(name="mock/deadly", api_key="sk-poison-key")], "poison"))
    for delivery in range(1, contract.GIVE_UP_AT_DELIVERY_COUNT + 1):
        victim = start_worker("primary", concurrency=1)
        if delivery == 1:
            publish_raw(broker_url, body, REPLIES, message_id="r-poison")
        _wait_for_call(mock_control, "deadly", delivery)
        victim.kill()  # each delivery kills its worker mid-call

    survivor = start_worker("primary", concurrency=1)
    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.status is not None and reply.status.code == Code.INTERNAL
    assert reply.status.log_id == log_id_for("r-poison", 0)
    assert "gave up after 5 deliveries" in reply.status.message
    [record] = wait_for_records(sink, "r-poison", 1)
    assert record.status == "error" and record.error_code == Code.INTERNAL and "gave up" in (record.error_message or "")
    [dead] = read_dead_letters(broker_url, 1)
    assert b"sk-poison-key" not in dead.body and b"poison" in dead.body
    # Not the request's count of 4 (the dead queue may add its own 0): a replayed dead letter starts afresh.
    assert dead.headers.get(contract.HEADER_DELIVERY_COUNT, 0) == 0
    assert len(mock_control.calls()) == contract.GIVE_UP_AT_DELIVERY_COUNT  # the fifth delivery called nothing
    assert "message.given_up" in survivor.log_text()


def test_a_delivery_count_sent_by_the_producer_is_not_trusted(start_worker: StartWorker, broker_url: str) -> None:
    start_worker("primary")
    headers = {contract.HEADER_DELIVERY_COUNT: 99}
    publish_raw(broker_url, encode(make_request(["mock/a"], "fresh")), REPLIES, headers=headers)
    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.result().text == "a says: fresh"

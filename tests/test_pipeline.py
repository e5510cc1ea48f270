"""The whole pipeline: real RabbitMQ, real worker processes, real HTTP to the mock LLM."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from amqp.exceptions import MessageNacked

from multillm import contract
from multillm.errors import Code, InvalidArgument, Unavailable
from multillm.mock_llm import MockControl
from multillm.producers import AsyncClient, Client, ReplyQueue, make_request
from multillm.producers.publishing import connect, declare_queues, queue_counts
from multillm.records import log_id_for
from multillm.schemas import V1Model, V1Tracing, encode
from multillm.sinks import Sink
from multillm.testbed.rabbitmq import rabbitmqctl, vhost_of
from tests.broker_tools import publish_copy, publish_raw, read_dead_letters
from tests.conftest import StartWorker, wait_for_log, wait_for_records


@pytest.mark.parametrize("sink_url", ["sqlite", "jsonl", "postgres"], indirect=True)
def test_three_models_one_reply_three_records(
    start_worker: StartWorker, client: Client, sink: Sink, mock_control: MockControl
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/beta")
    start_worker("model", model="mock/gamma")
    tracing = V1Tracing(session_id="sess-1", trace_id="trace-abc", span_id="span-req")
    request = make_request(
        ["mock/alpha", "mock/beta", "mock/gamma"],
        "What is AMQP?",
        tracing=tracing,
        log_attributes={"team": "x"},
    )

    future = client.submit(request)
    reply = future.result(timeout=30)
    records = wait_for_records(sink, future.request_id, 3)

    assert [r.model_index for r in records] == [0, 1, 2]
    assert [r.model_name for r in records] == ["mock/alpha", "mock/beta", "mock/gamma"]
    assert [r.is_primary for r in records] == [True, False, False]
    assert reply.id == records[0].log_id == log_id_for(future.request_id, 0)
    assert reply.completion.id == reply.id
    assert reply.model_names == ["mock/alpha", "mock/beta", "mock/gamma"]
    assert reply.mode == "MODE_PROD" and all(r.mode == "MODE_PROD" for r in records)
    assert reply.tracing == tracing

    calls = {c.model: c for c in mock_control.calls()}
    assert reply.primary_external_id == calls["alpha"].id
    assert reply.primary_external_id.startswith("chatcmpl-")
    assert [r.external_id for r in records] == [calls["alpha"].id, calls["beta"].id, calls["gamma"].id]
    assert reply.text and reply.text == records[0].output[0].message.content  # type: ignore[index]
    assert len({r.output[0].message.content for r in records}) == 3  # type: ignore[index]

    for record in records:
        assert record.status == "ok" and record.attempts == 1
        assert record.request_id == future.request_id
        assert record.trace_id == "trace-abc" and record.session_id == "sess-1"
        assert record.parent_span_id == "span-req"
        assert record.total_tokens and record.total_tokens > 0
        assert record.log_attributes[0].key == "team"
    assert len({r.span_id for r in records} | {"span-req"}) == 4


def test_display_model_one_makes_the_second_model_primary(
    start_worker: StartWorker, client: Client, sink: Sink, mock_control: MockControl
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/alpha")
    future = client.submit(make_request(["mock/alpha", "mock/beta"], "hi", display_model=1))
    reply = future.result(timeout=30)
    records = wait_for_records(sink, future.request_id, 2)

    assert reply.display_model == 1
    assert reply.completion.model == "mock/beta"
    assert [r.is_primary for r in records] == [False, True]
    assert reply.id == records[1].log_id
    assert reply.primary_external_id == {c.model: c.id for c in mock_control.calls()}["beta"]


def test_fifty_threads_each_get_their_own_reply(start_worker: StartWorker, client: Client) -> None:
    start_worker("primary", concurrency=8)
    prompts = [f"question number {i}" for i in range(50)]

    def ask(prompt: str) -> str:
        return client.create(make_request(["mock/echo"], prompt), timeout=60).text

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        assert prompt.split()[-1] in answer, (prompt, answer)
    assert len(set(answers)) == 50


def test_replies_past_the_prefetch_are_all_delivered_and_all_acked(
    start_worker: StartWorker, client: Client, broker_url: str
) -> None:
    # The listener acks its replies in batches: many more than the broker lets it hold
    # unacked (64) must still all arrive, and none stay unacked once they stop coming.
    start_worker("primary", concurrency=16)
    futures = [client.submit(make_request(["mock/echo"], f"batch {i}"), timeout=60) for i in range(300)]
    answers = [future.result(timeout=60).text for future in futures]
    assert all(f"batch {i}" in answer for i, answer in enumerate(answers)), answers[:3]

    def unacked() -> list[str]:
        listing = rabbitmqctl(
            "list_queues",
            "-p",
            vhost_of(broker_url),
            "name",
            "messages",
            "messages_unacknowledged",
            "--no-table-headers",
        )
        return [line for line in listing.splitlines() if line.startswith(client.reply_queue)]

    deadline = time.monotonic() + 10
    while (rows := unacked()) != [f"{client.reply_queue}\t0\t0"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rows == [f"{client.reply_queue}\t0\t0"]


def test_fifty_asyncio_calls_each_get_their_own_reply(start_worker: StartWorker, broker_url: str) -> None:
    start_worker("primary", concurrency=8)

    async def main() -> list[str]:
        async with AsyncClient(broker_url, timeout=60) as aclient:
            replies = await asyncio.gather(
                *(aclient.create(make_request(["mock/echo"], f"async question {i}")) for i in range(50))
            )
        return [r.text for r in replies]

    answers = asyncio.run(main())
    for i, answer in enumerate(answers):
        assert f"{i}" in answer.split()[-1] or f" {i}" in answer, (i, answer)
    assert len(set(answers)) == 50


def test_two_primary_workers_share_the_work(
    start_worker: StartWorker, client: Client, mock_control: MockControl
) -> None:
    mock_control.set_fault("slow", latency_ms=150)
    # request.accepted is a debug line.
    first = start_worker("primary", concurrency=1, env={"MULTILLM_LOG_LEVEL": "debug"})
    second = start_worker("primary", concurrency=1, env={"MULTILLM_LOG_LEVEL": "debug"})
    futures = [client.submit(make_request(["mock/slow"], f"job {i}")) for i in range(12)]
    for future in futures:
        future.result(timeout=60)

    served = [w.log_text().count('"request.accepted"') for w in (first, second)]
    assert sum(served) == 12
    assert min(served) >= 1, served


def test_rate_limited_twice_then_ok_takes_three_attempts(
    start_worker: StartWorker, client: Client, sink: Sink, mock_control: MockControl
) -> None:
    start_worker("primary")
    mock_control.set_fault("flaky", statuses=[429, 429], retry_after=0.01)
    future = client.submit(make_request(["mock/flaky"], "hello"))
    reply = future.result(timeout=30)
    [record] = wait_for_records(sink, future.request_id, 1)
    assert reply.text
    assert record.status == "ok" and record.attempts == 3
    assert [c.status for c in mock_control.calls()] == [429, 429, 200]


def test_provider_down_for_good_gets_unavailable_within_the_budget(
    start_worker: StartWorker, client: Client, sink: Sink, mock_control: MockControl
) -> None:
    start_worker("primary")
    mock_control.set_fault("down", always=503)
    future = client.submit(make_request(["mock/down"], "hello"))
    with pytest.raises(Unavailable) as caught:
        future.result(timeout=30)  # the budget in the test config is 5 s; the SDK's own would be minutes
    assert caught.value.code == Code.UNAVAILABLE
    [record] = wait_for_records(sink, future.request_id, 1)
    assert record.status == "error" and record.error_code == Code.UNAVAILABLE
    assert record.attempts == 4 == len(mock_control.calls())
    assert record.error_message and "503" in record.error_message


def test_undecodable_request_gets_invalid_argument_and_is_dead_lettered(
    start_worker: StartWorker, client: Client, broker_url: str
) -> None:
    start_worker("primary")
    replies = ReplyQueue(broker_url, "test.replies")
    replies.declare()
    publish_raw(
        broker_url,
        b'{"models": [{"name": "mock/a", "apiKey": "sk-live-SECRET"}], "messages": [',
        "test.replies",
    )
    got = []
    replies.consume(got.append, limit=1, idle_timeout=20)

    [reply] = got
    assert reply.status is not None and reply.status.code == Code.INVALID_ARGUMENT
    assert "malformed" in reply.status.message or "truncated" in reply.status.message
    [dead] = read_dead_letters(broker_url, 1)
    assert dead.headers[contract.HEADER_ERROR_CODE] == Code.INVALID_ARGUMENT
    assert dead.headers[contract.HEADER_SOURCE_QUEUE] == contract.REQUEST_QUEUE
    assert b"sk-live-SECRET" not in dead.body
    # and the worker keeps serving
    assert client.create(make_request(["mock/a"], "still there?")).text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"models": [], "messages": [{"role": "user", "content": "x"}]}', "$.models"),
        (
            b'{"models": [{"name": "mock/a"}], "messages": [{"role": "user", "content": "x"}], "displayModel": 1}',
            "$.displayModel",
        ),
        (b'{"models": [{"name": "mock/a"}], "messages": "hi"}', "$.messages"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "models"),
        (b'{"models": [{"name": "nope/a"}], "messages": [{"role": "user", "content": "x"}]}', "nope"),
    ],
)
def test_invalid_requests_get_an_error_naming_the_problem(
    start_worker: StartWorker, broker_url: str, body: bytes, field: str
) -> None:
    start_worker("primary")
    replies = ReplyQueue(broker_url, "test.replies")
    replies.declare()
    publish_raw(broker_url, body, "test.replies")
    got = []
    replies.consume(got.append, limit=1, idle_timeout=20)
    [reply] = got
    with pytest.raises(InvalidArgument) as caught:
        reply.result()
    assert field in caught.value.message


def test_copy_for_a_model_without_a_queue_becomes_an_error_record(
    start_worker: StartWorker, client: Client, sink: Sink
) -> None:
    start_worker("primary")
    future = client.submit(make_request(["mock/alpha", "mock/nobody-serves-me"], "hi"))
    assert future.result(timeout=30).text
    records = wait_for_records(sink, future.request_id, 2)
    assert [r.status for r in records] == ["ok", "error"]
    assert records[1].error_code == Code.UNAVAILABLE
    assert "multillm worker model --model mock/nobody-serves-me" in (records[1].error_message or "")


def test_a_copy_the_broker_refuses_is_recorded_before_the_reply(
    start_worker: StartWorker, client: Client, sink: Sink, broker_url: str
) -> None:
    # A full queue (max-length 0 by policy; the queues overflow with reject-publish) nacks the copy.
    # Its confirm comes in while the primary answers, and the reply waits for it: by the time the
    # caller has the reply, the refused model's error record is in the sink.
    full, served = "mock/beta", "mock/gamma"
    with connect(broker_url) as connection:
        declare_queues(connection, contract.model_queue_spec(full), contract.model_queue_spec(served))
    pattern = f"^{re.escape(contract.model_queue(full))}$"
    rabbitmqctl("set_policy", "-p", vhost_of(broker_url), "--apply-to", "queues", "full", pattern, '{"max-length": 0}')
    _fill_until_refused(broker_url, full)
    start_worker("primary")
    future = client.submit(make_request(["mock/alpha", full, served], "hi"))
    assert future.result(timeout=30).text
    records = {r.model_name: r for r in sink.records(future.request_id)}
    assert records["mock/alpha"].status == "ok"
    assert records[full].status == "error" and records[full].error_code == Code.UNAVAILABLE
    assert f"multillm worker model --model {full}" in (records[full].error_message or "")
    assert served not in records  # its copy waits in its queue for a worker
    assert queue_counts(broker_url, contract.model_queue(served))[0] == 1


def test_a_copy_refused_for_a_moment_is_published_again(
    start_worker: StartWorker, client: Client, sink: Sink, broker_url: str
) -> None:
    # A queue that refuses only for a while (as a quorum queue of a cluster may): full (at most
    # one message by policy) until the test empties it. The worker publishes the copy again
    # after a short wait, and it is taken: no error record.
    model = "mock/beta"
    with connect(broker_url) as connection:
        declare_queues(connection, contract.model_queue_spec(model))
    pattern = f"^{re.escape(contract.model_queue(model))}$"
    rabbitmqctl("set_policy", "-p", vhost_of(broker_url), "--apply-to", "queues", "full", pattern, '{"max-length": 1}')
    _fill_until_refused(broker_url, model)
    primary = start_worker("primary")
    future = client.submit(make_request(["mock/alpha", model], "hi"))
    wait_for_log(primary, "publish.refused")
    with connect(broker_url) as connection:
        connection.default_channel.queue_purge(contract.model_queue(model))
    assert future.result(timeout=30).text
    assert queue_counts(broker_url, contract.model_queue(model))[0] == 1  # the copy, waiting for a worker
    assert [r.model_name for r in sink.records(future.request_id)] == ["mock/alpha"]


def _fill_until_refused(broker_url: str, model: str) -> None:
    """Publish fillers to `model`'s queue until the broker refuses one (its policy is in force:
    a quorum queue takes messages until it is over its length, and applies a policy a moment later)."""
    for _ in range(50):
        try:
            publish_copy(broker_url, b"filler", model)
        except MessageNacked:
            return
        time.sleep(0.1)
    raise AssertionError(f"the queue of {model} kept taking messages")


def test_request_api_key_is_used_and_never_stored_or_logged(
    start_worker: StartWorker, client: Client, sink: Sink, sink_url: str, mock_control: MockControl
) -> None:
    primary = start_worker("primary")
    other = start_worker("model", model="mock/beta")
    secret = "sk-request-key-that-must-not-leak"
    nobody = "sk-key-of-a-model-nobody-serves"  # its copy is returned unroutable: pika would log its body
    request = make_request(
        [
            V1Model(name="mock/alpha", api_key=secret),
            V1Model(name="mock/beta"),
            V1Model(name="mock/nobody", api_key=nobody),
        ],
        "hi",
    )
    future = client.submit(request)
    reply = future.result(timeout=30)
    wait_for_records(sink, future.request_id, 3)

    seen = {c.model: c.auth_sha256 for c in mock_control.calls()}
    assert seen["alpha"] == hashlib.sha256(secret.encode()).hexdigest()
    assert seen["beta"] != seen["alpha"]  # the other model used the configured key, not this one
    assert secret not in json.dumps(reply.completion.choices[0].message.content)
    assert all(secret not in encode(r).decode() for r in sink.records(future.request_id))
    db = sink_url.removeprefix("sqlite:///")
    for path in (db, db + "-wal", primary.log_path, other.log_path):  # a fresh row sits in the WAL file
        with open(str(path), "rb") as f:
            content = f.read()
            assert secret.encode() not in content and nobody.encode() not in content, path


def test_publish_without_waiting_then_read_the_named_reply_queue(
    start_worker: StartWorker, client: Client, broker_url: str
) -> None:
    start_worker("primary")
    ids = [client.publish(make_request(["mock/a"], f"later {i}"), reply_to="svc.replies") for i in range(3)]
    got = []
    queue = ReplyQueue(broker_url, "svc.replies")
    assert queue.consume(got.append, limit=3, idle_timeout=20) == 3
    assert sorted(r.request_id or "" for r in got) == sorted(ids)
    assert all(r.result().text for r in got)

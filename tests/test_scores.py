"""Scores: `llm_scores` in every sink, `V1Score` messages through `multillm.scores` to the primary
worker, `Client.score`, `AsyncClient.score`, `multillm logs score`, and what `logs show|stats|report`
make of them."""

from __future__ import annotations

import asyncio
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import msgspec
import pika
import psycopg
import pytest

from multillm import contract
from multillm.config import ENV_BROKER_URL, ENV_CONFIG, ENV_SINK_URL
from multillm.errors import Code
from multillm.producers import AsyncClient, Client, make_request
from multillm.records import log_id_for, stored_score
from multillm.schemas import LLMScore, V1Model, V1Score, checked_score, decode_score, encode
from multillm.sinks import RecordFilter, Sink, open_sink
from multillm.testbed.rabbitmq import rabbitmqctl, vhost_of
from tests.broker_tools import read_dead_letters
from tests.conftest import StartWorker, wait_for_log
from tests.test_cli import multillm
from tests.test_logs_cli import answer, run
from tests.test_logs_sinks import every_sink, record


def score(score_id: str, log_id: str, name: str = "quality", **fields: object) -> LLMScore:
    return LLMScore(
        score_id=score_id,
        log_id=log_id,
        name=name,
        created_at=str(fields.pop("created_at", f"2026-12-01T00:00:0{score_id[-1]}Z")),
        **fields,
    )


# --- every sink ------------------------------------------------------------------------------


@every_sink
def test_a_score_is_stored_once_and_read_with_its_record_even_when_it_came_first(sink: Sink) -> None:
    sink.write(record("log-a", request_id="req-a"))
    first = score("s-1", "log-a", value=0.5, comment="fine", source="reviewer")
    early = score("s-2", "log-b", name="feedback", label="up", value=1.0, request_id="req-b")
    changed = msgspec.structs.replace(first, value=0.9, comment="second thoughts")
    assert sink.write_scores([first, early, changed]) == [True, True, False]
    assert sink.write_scores([changed]) == [False]

    # Every score, that of a record not stored yet too; the first written under an id is kept.
    assert sink.scores() == [first, early]
    assert sink.scores(RecordFilter(request_id="req-a")) == [first]
    assert sink.scores(RecordFilter(request_id="req-b")) == []
    # Its record arrives: the score was kept, and now reads with it.
    sink.write(record("log-b", request_id="req-b", model="mock/b"))
    assert sink.scores(RecordFilter(request_id="req-b")) == [early]
    assert sink.scores(RecordFilter(model_name="mock/b")) == [early]


@every_sink
def test_a_reader_sees_the_scores_a_writer_stored(sink: Sink, sink_url: str) -> None:
    sink.write(record("log-a"))
    assert open_sink(sink_url, read_only=True).scores() == []  # none yet: not an error
    stored = score("s-1", "log-a", label="concise")
    sink.write_scores([stored])
    reader = open_sink(sink_url, read_only=True)
    try:
        assert reader.scores() == [stored]
    finally:
        reader.close()


# --- what a score must be --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "JSON is malformed"),
        (b'{"name": "quality", "value": 1}', "Object missing required field `logId`"),
        (b'{"logId": "l", "name": "", "value": 1}', "`name` is empty"),
        (b'{"logId": "l", "name": "' + b"n" * 201 + b'", "value": 1}', "length <= 200 - at `$.name`"),
        (b'{"logId": "l", "name": "tone of voice", "value": 1}', "`name` contains U+0020 at character 4"),
        (b'{"logId": "l", "name": "quality", "value": 1e999}', "Number out of range - at `$.value`"),
        (b'{"logId": "l", "name": "quality", "value": "high"}', "Expected `float | null`, got `str`"),
        (b'{"logId": "l", "name": "quality"}', "neither a `value` nor a `label`"),
        (b'{"logId": "l", "name": "feedback", "label": "meh"}', "`feedback` takes `label` up or down, not 'meh'"),
        (b'{"logId": "l", "name": "feedback", "label": "up", "value": 0}', "`feedback` up has `value` 1, not 0"),
    ],
)
def test_a_score_that_cannot_be_stored_is_refused_with_the_reason(body: bytes, problem: str) -> None:
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)) as refused:
        decode_score(body)
    assert problem in str(refused.value)


def test_a_score_id_is_derived_from_record_name_and_source_unless_given() -> None:
    plain = V1Score(log_id="l", name="quality", value=1.0)
    assert plain.id == V1Score(log_id="l", name="quality", value=0.0, comment="other").id
    assert len({plain.id, V1Score(log_id="l", name="quality", value=1.0, source="judge").id}) == 2
    assert len({plain.id, V1Score(log_id="m", name="quality", value=1.0).id}) == 2
    assert V1Score(log_id="l", name="quality", value=1.0, score_id="mine").id == "mine"
    # Checked as the worker checks it: the limits of the fields' types too.
    with pytest.raises(ValueError, match="`value` inf is not a finite number"):
        checked_score(V1Score(log_id="l", name="quality", value=math.inf))
    with pytest.raises(ValueError, match=re.escape("length <= 10000 - at `$.comment`")):
        checked_score(V1Score(log_id="l", name="quality", value=1.0, comment="x" * 10_001))


# --- through the queue -----------------------------------------------------------------------


def _wait_for_scores(sink: Sink, count: int, timeout: float = 15.0) -> list[LLMScore]:
    deadline = time.monotonic() + timeout
    while len(found := sink.scores()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _publish_score(channel: Any, body: bytes) -> None:
    """As another program would: raw pika, the contract's exchange, routing key and type."""
    properties = pika.BasicProperties(content_type=contract.CONTENT_TYPE, type=contract.TYPE_SCORE, delivery_mode=2)
    channel.basic_publish(contract.SCORE_EXCHANGE, contract.SCORE_ROUTING_KEY, body, properties, mandatory=True)


def test_scores_from_the_client_the_async_client_and_raw_amqp_are_stored(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink, raw_channel: Any
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/upper")
    request = make_request(["mock/echo", "mock/upper"], "score me")
    primary_log = client.create(request).id
    [primary_record] = [r for r in sink.records() if r.log_id == primary_log]
    other_log = log_id_for(primary_record.request_id, 1)

    feedback_id = client.score(primary_log, "feedback", label="up", request_id=primary_record.request_id)

    async def from_asyncio() -> str:
        async with AsyncClient(broker_url) as async_client:
            return await async_client.score(other_log, "quality", value=0.25, comment="terse", source="reviewer")

    quality_id = asyncio.run(from_asyncio())
    # A program that sends no scoreId, for a record no worker has written (yet).
    _publish_score(raw_channel, b'{"logId": "not-yet", "name": "relevance", "value": 3}')

    stored = {s.score_id: s for s in _wait_for_scores(sink, 3)}
    assert stored[feedback_id] == LLMScore(
        score_id=feedback_id, log_id=primary_log, request_id=primary_record.request_id, name="feedback",
        value=1.0, label="up", created_at=stored[feedback_id].created_at,
    )  # fmt: skip
    assert (stored[quality_id].log_id, stored[quality_id].value, stored[quality_id].comment) == (
        other_log,
        0.25,
        "terse",
    )
    derived = V1Score(log_id="not-yet", name="relevance", value=3.0).id
    assert (stored[derived].log_id, stored[derived].value) == ("not-yet", 3.0)
    assert feedback_id == V1Score(log_id=primary_log, name="feedback", label="up").id
    # The same feedback again: the same id, no second row.
    assert client.score(primary_log, "feedback", label="up") == feedback_id
    assert len(_wait_for_scores(sink, 4, timeout=1.0)) == 3


def test_bad_scores_are_dead_lettered_with_the_reason_and_the_consumer_goes_on(
    start_worker: StartWorker, broker_url: str, sink: Sink, raw_channel: Any
) -> None:
    worker = start_worker("primary")
    bad = [
        (b"\xff\xfe not json", "invalid score: JSON is malformed: not UTF-8 at byte 0"),
        (b'{"logId": "l", "name": "", "value": 1}', "invalid score: `name` is empty"),
        (b'{"logId": "l", "name": "quality", "value": 1e999}', "invalid score: Number out of range - at `$.value`"),
        (b'{"logId": "l", "name": "quality"}', "invalid score: the score has neither a `value` nor a `label`"),
        # A request sent here by mistake: dead-lettered with its api key masked.
        (
            encode(make_request([V1Model(name="mock/echo", api_key="sk-secret-123")], "hi")),
            "invalid score: Object missing required field `logId`",
        ),
    ]  # fmt: skip
    for body, _ in bad:
        _publish_score(raw_channel, body)
    _publish_score(raw_channel, b'{"logId": "l", "name": "quality", "value": 0.5}')

    letters = read_dead_letters(broker_url, len(bad))
    assert [(d.headers[contract.HEADER_ERROR], d.headers[contract.HEADER_ERROR_CODE]) for d in letters] == [
        (reason, Code.INVALID_ARGUMENT) for _, reason in bad
    ]
    assert all(d.headers[contract.HEADER_SOURCE_QUEUE] == contract.SCORE_QUEUE for d in letters)
    masked = letters[-1].body if isinstance(letters[-1].body, bytes) else letters[-1].body.encode()
    assert b"sk-secret-123" not in masked and b'"apiKey":"***"' in masked
    [good] = _wait_for_scores(sink, 1)
    assert (good.log_id, good.value) == ("l", 0.5)
    assert worker.alive()
    assert "sk-secret-123" not in worker.log_text()


@pytest.mark.parametrize("sink_url", ["postgres"], indirect=True)
def test_a_score_redelivered_after_it_was_written_is_stored_once_and_acked(
    start_worker: StartWorker, broker_url: str, sink: Sink, sink_url: str, client: Client
) -> None:
    """The worker's connection is closed while its write waits on a table lock: the broker
    redelivers the score, which the first delivery then writes. The redelivery finds it stored."""
    worker = start_worker("primary")
    with psycopg.connect(sink_url) as locker:
        locker.execute(f"LOCK TABLE {contract.SCORE_TABLE} IN ACCESS EXCLUSIVE MODE")
        client.score("l", "quality", value=0.75, score_id="redelivered")
        _wait_for_lock_waiter(sink_url)
        rabbitmqctl("close_all_connections", "-p", vhost_of(broker_url), "test: redeliver the score")
        wait_for_log(worker, "broker.connection_lost")
        locker.rollback()  # releases the lock: the first delivery's write goes through
    wait_for_log(worker, "worker.consuming", timeout=20)
    [stored] = _wait_for_scores(sink, 1)
    assert (stored.score_id, stored.value) == ("redelivered", 0.75)
    # The redelivery was refused by the sink as a duplicate, and acked: nothing left, nothing dead.
    _wait_for_queue_empty(broker_url, contract.SCORE_QUEUE)
    wait_for_log(worker, '"score.duplicate"')
    assert worker.log_text().count('"score.duplicate"') == 1
    assert read_dead_letters(broker_url, 1, timeout=0.5) == []


def _wait_for_lock_waiter(url: str, timeout: float = 15.0) -> None:
    """Until another session waits for a lock (the worker's insert)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()
            if waiting and waiting[0] > 0:
                return
            time.sleep(0.05)
    raise AssertionError("the worker's write never waited on the lock")


def _wait_for_queue_empty(broker_url: str, queue: str, timeout: float = 15.0) -> None:
    """Until `queue` holds no message, ready or unacked."""
    deadline = time.monotonic() + timeout
    columns = ("name", "messages")
    while time.monotonic() < deadline:
        listed = rabbitmqctl("list_queues", "-p", vhost_of(broker_url), *columns, "--formatter", "json")
        if all(q["messages"] == 0 for q in json.loads(listed) if q["name"] == queue):
            return
        time.sleep(0.1)
    raise AssertionError(f"{queue} still holds messages")


# --- reading them: logs show, stats, report --------------------------------------------------

SCORED_RECORDS = [
    answer(1, 0, "mock/alpha", "alpha one", latency=100, mode="MODE_PROD", cost_usd=0.002),
    answer(1, 1, "mock/beta", "beta one", latency=300, mode="MODE_PROD", cost_usd=0.010),
    answer(2, 0, "mock/alpha", "alpha two", latency=120, mode="MODE_PROD", cost_usd=0.004),
    answer(2, 1, "mock/beta", "beta two", latency=280, mode="MODE_PROD", cost_usd=0.012),
    answer(3, 0, "mock/alpha", "alpha three", latency=110, mode="MODE_TEST", cost_usd=0.003),
]
# (log id, name, label, value): feedback and two numeric names, one record (log-3-0) outside MODE_PROD.
GIVEN = [
    ("log-1-0", "feedback", "up", None),
    ("log-2-0", "feedback", "down", None),
    ("log-3-0", "feedback", "up", None),
    ("log-1-1", "feedback", "up", None),
    ("log-1-0", "quality", None, 0.2),
    ("log-2-0", "quality", None, 0.9),
    ("log-3-0", "quality", None, 0.1),
    ("log-2-1", "quality", None, 0.7),
    ("log-2-1", "tone", "formal", None),
]


@pytest.fixture
def scored(sink_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    sink = open_sink(sink_url)
    try:
        assert all(sink.write_many(SCORED_RECORDS))
        rows = [
            stored_score(V1Score(log_id=log_id, name=name, label=label, value=value), f"2026-12-01T00:00:{n:02d}Z")
            for n, (log_id, name, label, value) in enumerate(GIVEN)
        ]
        assert all(sink.write_scores(rows))
    finally:
        sink.close()
    monkeypatch.setenv(ENV_SINK_URL, sink_url)
    return sink_url


@every_sink
def test_stats_give_feedback_share_score_means_and_costs_per_model(
    scored: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stats = {s["model_name"]: s for s in json.loads(run(capsys, "stats", "--json", "--mode", "prod"))}
    # Computed here from what was given, for the MODE_PROD records only.
    prod = {r.log_id: r for r in SCORED_RECORDS if r.mode == "MODE_PROD"}
    for model in ("mock/alpha", "mock/beta"):
        logs = {log_id for log_id, r in prod.items() if r.model_name == model}
        feedback = [label for log_id, name, label, _ in GIVEN if log_id in logs and name == "feedback"]
        quality = [value for log_id, name, _, value in GIVEN if log_id in logs and name == "quality"]
        costs = [r.cost_usd or 0.0 for r in prod.values() if r.model_name == model]
        expected_scores = {"quality": {"count": len(quality), "mean": round(statistics.fmean(quality), 4)}}
        if feedback:
            ups = [1.0 if label == "up" else 0.0 for label in feedback]
            expected_scores["feedback"] = {"count": len(ups), "mean": round(statistics.fmean(ups), 4)}
        got = stats[model]
        assert got["feedback"] == len(feedback)
        assert got["feedback_up_share"] == round(feedback.count("up") / len(feedback), 4)
        assert got["scores"] == expected_scores
        assert got["cost_usd"] == pytest.approx(math.fsum(costs))
        assert got["cost_per_1k_requests_usd"] == pytest.approx(1000 * math.fsum(costs) / len(costs))
    table = run(capsys, "stats", "--mode", "prod")
    assert re.search(r"mock/alpha .* 50% of 2 .* feedback 0\.5 n=2", table), table


@every_sink
def test_show_has_each_records_scores_and_the_report_a_cost_chart_and_a_scores_table(
    scored: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    shown = {r["log_id"]: r for r in json.loads(run(capsys, "show", "req-2", "--json"))}
    assert [(s["name"], s["label"], s["value"]) for s in shown["log-2-0"]["scores"]] == [
        ("feedback", "down", 0.0),
        ("quality", None, 0.9),
    ]
    assert [(s["name"], s["label"]) for s in shown["log-2-1"]["scores"]] == [("quality", None), ("tone", "formal")]
    table = run(capsys, "show", "req-2")
    assert "feedback down" in table and "tone formal" in table and "quality 0.7" in table

    page_path = tmp_path / "report.html"
    assert "5 records, 3 requests, 9 scores" in run(capsys, "report", "--html", str(page_path))
    page = page_path.read_text()
    cost = page.partition("<h2>Cost per 1,000 requests</h2>")[2].partition("<h2>")[0]
    assert cost.count("<rect") == 2 and "$3.00<" in cost and "$11.00<" in cost
    scores = page.partition("<h2>Scores</h2>")[2].partition("<h2>")[0]
    assert "<th>quality mean</th>" in scores and "67% of 3" in scores  # alpha: up, down, up


def test_logs_score_then_logs_show_shows_the_score(
    start_worker: StartWorker, client: Client, config_path: Path, broker_url: str, sink: Sink
) -> None:
    start_worker("primary")
    reply = client.create(make_request(["mock/echo"], "rate this"))
    env = {ENV_CONFIG: str(config_path), ENV_BROKER_URL: broker_url}
    done = multillm("logs", "score", reply.id, "--name", "feedback", "--label", "up", "--comment", "spot on", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"score {V1Score(log_id=reply.id, name='feedback', label='up').id} of record")
    assert len(_wait_for_scores(sink, 1)) == 1
    request_id = sink.records()[0].request_id
    shown = json.loads(multillm("logs", "show", request_id, "--json", env=env).stdout)
    assert [(s["name"], s["label"], s["value"], s["comment"]) for s in shown[0]["scores"]] == [
        ("feedback", "up", 1.0, "spot on")
    ]
    bad = multillm("logs", "score", reply.id, "--name", "feedback", "--label", "meh", env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        f"multillm: cannot score record {reply.id!r}: `feedback` takes `label` up or down, not 'meh'"
    )

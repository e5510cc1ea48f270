"""`multillm replay` and `multillm logs compare` as a user runs them: real workers, broker, mock and
sink; every figure of the comparison checked against numbers computed here from the records."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from multillm.cli.comparison import wilson
from multillm.config import ENV_BROKER_URL, ENV_CONFIG
from multillm.producers import Client, make_request
from multillm.schemas import LLMLogRecord, LogAttribute
from multillm.sinks import RecordFilter, Sink
from tests.conftest import StartWorker
from tests.test_cli import multillm

PRICES = (
    '[prices."mock/echo"]\ninput_per_mtok = 1.0\noutput_per_mtok = 4.0\n'
    '[prices."mock/upper"]\ninput_per_mtok = 0.5\noutput_per_mtok = 1.0\n'
    '[prices."mock/judge"]\ninput_per_mtok = 0.1\noutput_per_mtok = 0.1\n'
)


@pytest.fixture
def env(config_path: Path, broker_url: str) -> dict[str, str]:
    config_path.write_text(config_path.read_text() + PRICES)
    return {ENV_CONFIG: str(config_path), ENV_BROKER_URL: broker_url}


def _wait(sink: Sink, where: RecordFilter, count: int, timeout: float = 20.0) -> list[LLMLogRecord]:
    deadline = time.monotonic() + timeout
    while len(found := sink.records(where=where)) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} records"
        time.sleep(0.05)
    return found


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_wilson_interval_matches_published_values() -> None:
    # Newcombe (1998), table I: 81/263 -> 0.2553-0.3662; and the edges, where the normal interval fails.
    assert [round(b, 4) for b in wilson(81, 263)] == [0.2553, 0.3662]
    assert [round(b, 4) for b in wilson(0, 10)] == [0.0, 0.2775]
    assert [round(b, 4) for b in wilson(10, 10)] == [0.7225, 1.0]


def test_replay_sends_logged_inputs_to_a_new_model_once(
    start_worker: StartWorker, client: Client, sink: Sink, env: dict[str, str]
) -> None:
    start_worker("primary")
    attributes = {"feature": "search"}
    for i in range(3):
        client.create(make_request(["mock/echo"], f"question {i}", log_attributes=attributes))
    original_records = {r.request_id: r for r in sink.records()}
    assert len(original_records) == 3

    dry = multillm("replay", "--model", "mock/upper", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would replay 3 requests to mock/upper: 3 copies (0 answered before, skipped)" in dry.stdout

    unserved = multillm("replay", "--model", "mock/upper", env=env)
    assert unserved.returncode == 1
    assert "no worker serves mock/upper: start `multillm worker model --model mock/upper`" in unserved.stderr

    start_worker("model", model="mock/upper")
    done = multillm("replay", "--model", "mock/upper", "--rate", "50", env=env)
    assert done.returncode == 0, done.stderr
    assert "replayed 3 requests to mock/upper: 3 copies" in done.stdout

    replayed = _wait(sink, RecordFilter(model_name="mock/upper"), 3)
    assert {r.request_id for r in replayed}.isdisjoint(original_records)
    for record in replayed:
        original = original_records[next(a.value for a in record.log_attributes if a.key == "replayOf")]
        assert record.messages == original.messages and record.status == "ok" and not record.is_primary
        assert record.log_attributes == [
            *original.log_attributes,
            LogAttribute(key="replayOf", value=original.request_id),
        ]
        assert (record.output or [])[0].message.content == "upper says: " + original.messages[0].content.upper()  # type: ignore[union-attr]

    again = multillm("replay", "--model", "mock/upper", env=env)
    assert again.returncode == 0, again.stderr
    assert "3 requests to mock/upper: 0 copies (3 answered before, skipped)" in again.stdout
    # Replays of replays go back to the original; the filter picks the replays' own records.
    of_replays = multillm("replay", "--model", "mock/upper", "--from-model", "mock/upper", "--dry-run", env=env)
    assert "would replay 3 requests to mock/upper: 0 copies (3 answered before, skipped)" in of_replays.stdout
    assert len(sink.records(where=RecordFilter(model_name="mock/upper"))) == 3


def test_compare_figures_from_the_records_with_judged_replays(
    start_worker: StartWorker, client: Client, sink: Sink, env: dict[str, str]
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/upper")
    start_worker("judge", model="mock/judge")
    # Two requests that name both models, three that the candidate only sees by replay, and one
    # where the judge is shown a position-biased prompt (a tie).
    for i in range(2):
        client.create(make_request(["mock/echo", "mock/upper"], f"both {i}"))
    for i in range(3):
        client.create(make_request(["mock/echo"], f"echo only {i}"))
    client.create(make_request(["mock/echo", "mock/upper"], "[judge:first] biased"))
    _wait(sink, RecordFilter(model_name="mock/upper"), 3)
    replayed = multillm("replay", "--model", "mock/upper", env=env)
    assert "replayed 6 requests to mock/upper: 3 copies (3 answered before, skipped)" in replayed.stdout
    upper = _wait(sink, RecordFilter(model_name="mock/upper"), 6)
    deadline = time.monotonic() + 20
    while len(sink.scores()) < 6:
        assert time.monotonic() < deadline, f"{len(sink.scores())} of 6 verdicts"
        time.sleep(0.05)

    done = multillm("logs", "compare", "--baseline", "mock/echo", "--candidate", "mock/upper", "--json", env=env)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)

    echo = {r.request_id: r for r in sink.records(where=RecordFilter(model_name="mock/echo"))}
    pairs = [(echo[next((a.value for a in u.log_attributes if a.key == "replayOf"), u.request_id)], u) for u in upper]
    assert figures["pairs"] == len(pairs) == 6
    for side, records in (("baseline", [b for b, _ in pairs]), ("candidate", [c for _, c in pairs])):
        latencies = [r.latency_ms or 0.0 for r in records]
        assert figures[side]["latency_ms_p50"] == round(_nearest_rank(latencies, 0.5), 1)
        assert figures[side]["latency_ms_p95"] == round(_nearest_rank(latencies, 0.95), 1)
        assert figures[side]["errors"] == 0
        costs = [r.cost_usd or 0.0 for r in records]
        assert figures[side]["cost_per_1k_requests_usd"] == pytest.approx(sum(costs) / len(costs) * 1000, rel=1e-6)
        assert figures[side]["mean_completion_tokens"] == pytest.approx(
            sum(r.completion_tokens or 0 for r in records) / len(records), abs=0.05
        )
    assert figures["cost_ratio"] == pytest.approx(
        figures["candidate"]["cost_per_1k_requests_usd"] / figures["baseline"]["cost_per_1k_requests_usd"], abs=1e-3
    )
    # upper's capitals beat echo's in 5 pairs; the biased one is a tie
    verdicts = figures["verdicts"]
    assert (verdicts["win"], verdicts["tie"], verdicts["loss"], verdicts["judged"]) == (5, 1, 0, 6)
    low, high = wilson(6, 6)
    assert (verdicts["win_or_tie_ci95_low"], verdicts["win_or_tie_ci95_high"]) == (round(low, 4), round(high, 4))
    assert figures["conclusion"].startswith("On 6 pairs: the figures support: the candidate is at least as good")
    assert "a decision on 6 pairs (collect at least 30)" in figures["conclusion"]

    # The other way round, the same verdicts turned: the baseline is now the candidate and loses.
    turned = json.loads(
        multillm("logs", "compare", "--baseline", "mock/upper", "--candidate", "mock/echo", "--json", env=env).stdout
    )
    assert (turned["verdicts"]["win"], turned["verdicts"]["tie"], turned["verdicts"]["loss"]) == (0, 1, 5)

    table = multillm("logs", "compare", "--baseline", "mock/echo", "--candidate", "mock/upper", env=env)
    assert "5 / 1 / 0" in table.stdout and "100% (61%-100%)" in table.stdout
    assert table.stdout.strip().splitlines()[-1] == figures["conclusion"]


def test_compare_names_what_is_missing(
    sink: Sink, env: dict[str, str], start_worker: StartWorker, client: Client
) -> None:
    start_worker("primary")
    client.create(make_request(["mock/echo"], "alone"))
    none = multillm("logs", "compare", "--baseline", "mock/echo", "--candidate", "mock/upper", env=env)
    assert none.returncode == 0, none.stderr
    assert "No pairs: no request has records of both mock/echo and mock/upper" in none.stdout
    same = multillm("logs", "compare", "--baseline", "mock/echo", "--candidate", "mock/echo", env=env)
    assert same.returncode == 1 and "name two models" in same.stderr

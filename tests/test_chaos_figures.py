"""The chaos run's figures, from made-up sources: each one can show the failure it names."""

from __future__ import annotations

import json

from multillm.mock_llm import MockCall
from multillm.schemas import LLMLogRecord
from multillm.testbed.chaos_figures import (
    REFUSED_WRITE_EVENT,
    ChaosReport,
    count_calls,
    count_records,
    records_without_their_answer,
    refused_writes,
)


def call(model: str, prompt: str, status: int = 200, id: str | None = None) -> MockCall:
    return MockCall(id=id, model=model, status=status, auth_sha256=None, prompt=prompt)


def record(request_id: str, model: str, index: int, external_id: str | None = None) -> LLMLogRecord:
    return LLMLogRecord(
        log_id=f"{request_id}-{index}",
        request_id=request_id,
        model_name=model,
        model_index=index,
        is_primary=index == 0,
        external_id=external_id,
    )


def test_calls_before_a_pairs_first_answer_are_retries_those_after_it_repeats() -> None:
    report = ChaosReport()
    calls = [
        call("alpha", "p1", 500),
        call("alpha", "p1", 0),
        call("alpha", "p1"),  # two retries, then the answer
        call("beta", "p1"),
        call("beta", "p1"),  # the same work again: a redelivery
        call("beta", "p1", 429),  # and again, failing this time
        call("alpha", "p2", 503),
        call("alpha", "p2", 503),
        call("alpha", "p2", 503),  # never answered: all retries
        call("alpha", "not ours"),  # another run's prompt
    ]
    count_calls(report, calls, {"p1", "p2"})
    assert report.model_calls == 9
    assert report.mock_calls_failed == 6
    assert report.retrying_calls == 2 + 2
    assert report.repeated_model_calls == 2


def test_records_are_counted_once_per_request_and_model() -> None:
    report = ChaosReport(records_expected=4)
    found = count_records(
        report, [record("r1", "mock/alpha", 0), record("r1", "mock/alpha", 0), record("r2", "m/b", 1)]
    )
    assert found == report.records_found == 2
    assert report.lost_records == 2


def test_an_ok_record_must_carry_an_answer_the_mock_gave_that_model_for_that_prompt() -> None:
    calls = [call("alpha", "p1", id="c1"), call("beta", "p1", id="c2"), call("alpha", "p2", id="c3")]
    prompts = {"r1": "p1", "r2": "p2"}
    good = [
        record("r1", "mock/alpha", 0, "c1"),
        record("r1", "mock/beta", 1, "c2"),
        record("r2", "mock/alpha", 0, "c3"),
    ]
    assert records_without_their_answer(good, prompts, calls) == 0
    swapped = record("r2", "mock/alpha", 0, "c1")  # another request's answer
    wrong_model = record("r1", "mock/alpha", 0, "c2")
    invented = record("r1", "mock/beta", 1, "c9")
    failed = record("r2", "mock/beta", 1)
    failed.status = "error"  # an error record carries no answer to check
    assert records_without_their_answer([swapped, wrong_model, invented, failed], prompts, calls) == 3


def test_refused_writes_are_counted_from_the_workers_json_lines_of_the_requests_sent() -> None:
    lines = [
        json.dumps({"event": REFUSED_WRITE_EVENT, "request_id": "r1", "level": "info"}),
        json.dumps({"event": REFUSED_WRITE_EVENT, "request_id": "r1", "level": "info"}),
        json.dumps({"event": REFUSED_WRITE_EVENT, "request_id": "another run's"}),
        json.dumps({"event": "record.written", "request_id": "r1"}),
        json.dumps({"event": "consumer.started", "note": REFUSED_WRITE_EVENT}),
        f"pika.adapters WARNING {REFUSED_WRITE_EVENT} is not JSON",
        "[1, 2]",
    ]
    assert refused_writes(lines, {"r1", "r2"}) == 2


def test_the_run_is_clean_only_without_losses_or_contradictions() -> None:
    assert ChaosReport(repeated_model_calls=5, refused_record_writes=3, retrying_calls=9).clean
    assert not ChaosReport(records_without_their_answer=1).clean
    assert not ChaosReport(lost_records=1).clean

"""A bug anywhere in a handler still leaves every model a record, the caller a reply, and the message a
dead letter: real worker processes with a function replaced by one that raises (tests/injected_bug)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multillm import contract
from multillm.errors import Code
from multillm.producers import Client, ReplyQueue, make_request
from multillm.schemas import LLMLogRecord
from multillm.sinks import Sink
from tests.broker_tools import collect_replies, read_dead_letters
from tests.conftest import StartWorker, wait_for_records

REPLIES = "test.bugs.replies"
INJECTOR = str(Path(__file__).parent / "injected_bug")


@pytest.fixture(autouse=True)
def reply_queue(broker_url: str) -> None:
    queue = ReplyQueue(broker_url, REPLIES)
    queue.declare()
    queue.close()


def _buggy(*targets: str) -> dict[str, str]:
    return {"PYTHONPATH": INJECTOR, "MULTILLM_TEST_BUG": ",".join(targets)}


def _outcomes(sink: Sink, request_id: str) -> list[tuple[str, str, int | None]]:
    return [(r.model_name, r.status, r.error_code) for r in wait_for_records(sink, request_id, 2)]


def _record(sink: Sink, request_id: str, model_index: int) -> LLMLogRecord:
    # the sink returns a request's records in the order they were written, which is a race between workers
    [record] = [r for r in sink.records(request_id) if r.model_index == model_index]
    return record


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        # after the primary's record was written: that record stays, the reply is an error
        ("multillm.workers.primary:_reply_body", [("mock/a", "ok", None), ("mock/b", "ok", None)]),
        # in the primary's call: its record is the error
        ("multillm.workers.model_run:ModelRunner.run", [("mock/a", "error", 13), ("mock/b", "ok", None)]),
        # before any copy went out: no model worker will see the request, so both records are errors
        ("multillm.workers.primary:_fanout", [("mock/a", "error", 13), ("mock/b", "error", 13)]),
    ],
)
def test_a_bug_in_the_primary_worker_leaves_every_model_a_record_and_the_caller_an_error(
    start_worker: StartWorker,
    client: Client,
    broker_url: str,
    sink: Sink,
    where: str,
    expected: list[tuple[str, str, int | None]],
) -> None:
    start_worker("primary", env=_buggy(where))
    start_worker("model", model="mock/b")

    request_id = client.publish(make_request(["mock/a", "mock/b"], f"bug in {where}"), reply_to=REPLIES)

    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.status is not None and reply.status.code == Code.INTERNAL
    assert reply.status.message == "internal error while serving the request: RuntimeError"
    [detail] = reply.status.details
    assert detail.reason == contract.REASON_INTERNAL_ERROR
    assert _outcomes(sink, request_id) == expected
    primary = _record(sink, request_id, 0)
    assert reply.status.log_id == primary.log_id
    [dead] = read_dead_letters(broker_url, 1)
    assert dead.headers[contract.HEADER_ERROR] == reply.status.message
    assert dead.headers[contract.HEADER_SOURCE_QUEUE] == contract.REQUEST_QUEUE


def test_a_bug_in_a_model_worker_leaves_its_model_an_error_record(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/b", env=_buggy("multillm.workers.model_run:ModelRunner.run"))

    request_id = client.publish(make_request(["mock/a", "mock/b"], "bug in the model worker"), reply_to=REPLIES)

    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.completion is not None
    assert _outcomes(sink, request_id) == [("mock/a", "ok", None), ("mock/b", "error", 13)]
    assert _record(sink, request_id, 1).error_message == "internal error while serving the copy: RuntimeError"
    [dead] = read_dead_letters(broker_url, 1)
    assert dead.headers[contract.HEADER_SOURCE_QUEUE] == contract.model_queue("mock/b")


def test_a_bug_in_on_error_too_still_dead_letters_the_message(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink
) -> None:
    worker = start_worker(
        "primary", env=_buggy("multillm.workers.primary:_reply_body", "multillm.workers.primary:PrimaryHandler.give_up")
    )

    client.publish(make_request(["mock/a"], "two bugs"), reply_to=REPLIES)

    [dead] = read_dead_letters(broker_url, 1)
    assert dead.headers[contract.HEADER_ERROR] == "could not settle this message (see the worker's log)"
    assert dead.headers[contract.HEADER_ERROR_CODE] == Code.INTERNAL
    assert worker.alive()

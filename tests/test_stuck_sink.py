"""A worker whose database stopped answering mid-write still stops on SIGTERM, and loses nothing."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest

from multillm import contract
from multillm.config import ENV_CONFIG
from multillm.mock_llm import MockControl
from multillm.producers import Client, ReplyQueue, make_request
from multillm.sinks import Sink
from tests.broker_tools import collect_replies
from tests.conftest import StartWorker, wait_for_records

REPLIES = "test.stuck.replies"


@pytest.mark.parametrize("sink_url", ["postgres"], indirect=True)
def test_sigterm_ends_a_worker_stuck_in_a_record_write_and_the_request_is_served_again(
    start_worker: StartWorker,
    client: Client,
    broker_url: str,
    sink: Sink,
    sink_url: str,
    config_path: Path,
    tmp_path: Path,
) -> None:
    replies = ReplyQueue(broker_url, REPLIES)
    replies.declare()
    replies.close()
    short_grace = tmp_path / "short-grace.toml"
    short_grace.write_text(config_path.read_text().replace("shutdown_grace_seconds = 10", "shutdown_grace_seconds = 1"))
    stuck = start_worker("primary", env={ENV_CONFIG: str(short_grace)})
    with psycopg.connect(sink_url) as blocker:
        # The database stops answering the worker: its INSERT waits for this lock.
        blocker.execute(f"LOCK TABLE {contract.LOG_TABLE} IN ACCESS EXCLUSIVE MODE")
        request_id = client.publish(make_request(["mock/a"], "stuck"), reply_to=REPLIES)
        _wait_for_waiting_insert(sink_url)

        stuck.process.send_signal(signal.SIGTERM)
        assert stuck.process.wait(timeout=30) == 0
        log = stuck.log_text()
        assert "worker.grace_expired" in log
        assert "sink.close_abandoned" in log
        assert "exiting with threads still busy" in log
        blocker.rollback()

    start_worker("primary")
    [reply] = collect_replies(broker_url, REPLIES, 1)
    assert reply.request_id == request_id and reply.completion is not None
    [record] = wait_for_records(sink, request_id, 1)
    assert record.status == "ok" and reply.completion.id == record.log_id


def _wait_for_waiting_insert(url: str, timeout: float = 20.0) -> None:
    """Block until some session of this database waits for a lock (the worker's record write)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            row = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the worker's record write never waited for the lock")


@pytest.mark.parametrize("sink_url", ["postgres"], indirect=True)
def test_a_call_slot_is_free_again_when_its_call_returns_not_when_its_record_is_written(
    start_worker: StartWorker, client: Client, broker_url: str, sink: Sink, sink_url: str, mock_control: MockControl
) -> None:
    """With one call slot, a second request's model call begins while the first's record waits for the
    database: the slot bounds model calls, and a wave of bookkeeping must not hold back the next calls."""
    replies = ReplyQueue(broker_url, REPLIES)
    replies.declare()
    replies.close()
    start_worker("primary", concurrency=1)
    with psycopg.connect(sink_url) as blocker:
        blocker.execute(f"LOCK TABLE {contract.LOG_TABLE} IN ACCESS EXCLUSIVE MODE")
        first = client.publish(make_request(["mock/a"], "first"), reply_to=REPLIES)
        second = client.publish(make_request(["mock/a"], "second"), reply_to=REPLIES)
        _wait_for_waiting_insert(sink_url)
        deadline = time.monotonic() + 20
        while [c.prompt for c in mock_control.calls()] != ["first", "second"]:
            assert time.monotonic() < deadline, f"the second call never began: {mock_control.calls()}"
            time.sleep(0.05)
        assert not collect_replies(broker_url, REPLIES, 1, idle_timeout=0.5)  # no reply before its record
        blocker.rollback()
    got = {reply.request_id: reply for reply in collect_replies(broker_url, REPLIES, 2)}
    assert got.keys() == {first, second}
    for request_id in (first, second):
        [record] = wait_for_records(sink, request_id, 1)
        assert record.status == "ok" and got[request_id].completion.id == record.log_id

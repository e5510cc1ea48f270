"""A worker whose database stopped answering mid-write still stops on SIGTERM, and loses nothing."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest

from multillm import contract
from multillm.config import ENV_CONFIG
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

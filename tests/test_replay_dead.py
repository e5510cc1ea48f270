"""`multillm logs replay-dead` against a real broker vhost and real sinks: good and bad records together."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import kombu
import msgspec
import pytest

from multillm import contract
from multillm.config import ENV_BROKER_URL, ENV_CONFIG, ENV_SINK_URL
from multillm.producers.publishing import connect, declare_queues, queue_counts
from multillm.schemas import encode
from multillm.sinks import open_sink
from tests.broker_tools import read_dead_letters
from tests.test_sinks import small_record


def publish_dead(broker_url: str, letters: list[tuple[bytes, str | None]]) -> None:
    """Put `(body, AMQP type)` dead letters in `multillm.dead`, in order, as the workers would."""
    with connect(broker_url) as connection:
        declare_queues(connection, contract.dead_queue())
        producer = kombu.Producer(connection.default_channel)
        for body, kind in letters:
            properties = {"type": kind} if kind else {}
            producer.publish(
                body,
                exchange="",
                routing_key=contract.DEAD_QUEUE,
                content_type=contract.CONTENT_TYPE,
                content_encoding="utf-8",
                headers={contract.HEADER_ERROR: "the sink did not take this record; replay it from here"},
                **properties,
            )


def replay(broker_url: str, sink_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_SINK_URL, ENV_CONFIG)}
    return subprocess.run(
        [sys.executable, "-m", "multillm", "logs", "replay-dead", "--sink", sink_url],
        env={**env, ENV_BROKER_URL: broker_url},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("sink_url", ["sqlite", "postgres"], indirect=True)
def test_replay_writes_every_good_record_and_leaves_the_rest_in_order(
    broker_url: str, sink_url: str, tmp_path: Path
) -> None:
    stored_already = small_record(6)
    sink = open_sink(sink_url)
    sink.write(stored_already)
    sink.close()
    # A record the sink refuses: no SQL integer column holds 2**63.
    too_big = msgspec.structs.replace(small_record(5), model_index=2**63)
    letters: list[tuple[bytes, str | None]] = [
        (encode(small_record(1)), "LLMLogRecord"),
        (b'{"models": []}', contract.TYPE_REQUEST),
        (b"not json at all", "LLMLogRecord"),
        (encode(small_record(4)), "LLMLogRecord"),
        (encode(too_big), "LLMLogRecord"),
        (encode(stored_already), "LLMLogRecord"),
        (b"no type", None),
    ]
    publish_dead(broker_url, letters)

    done = replay(broker_url, sink_url, tmp_path)
    assert done.returncode == 1, done.stderr  # some records could not be written
    lines = done.stdout.splitlines()
    assert lines[0].startswith("not written: dead letter 3 (no log_id): not a valid LLMLogRecord: JSON is malformed")
    assert lines[1].startswith("not written: dead letter 5 (log_id 'log-00005'): the sink refused it: ")
    assert lines[2] == (
        "3 records and scores written to the sink and removed from multillm.dead (1 of them were stored already);"
        " left in multillm.dead: 2 not written, 2 other dead letters"
    )
    assert len(lines) == 3
    assert "Traceback" not in done.stderr

    sink = open_sink(sink_url)
    try:
        assert sorted(r.log_id for r in sink.records()) == ["log-00001", "log-00004", "log-00006"]
    finally:
        sink.close()

    # Everything else is back in the queue, in the order it was in.
    left = read_dead_letters(broker_url, 4)
    bodies = [d.body.encode() if isinstance(d.body, str) else d.body for d in left]  # kombu may decode them
    assert bodies == [letters[i][0] for i in (1, 2, 4, 6)]
    assert queue_counts(broker_url, contract.DEAD_QUEUE)[0] == 0


def test_replay_again_reports_the_same_failures_once_each(broker_url: str, tmp_path: Path) -> None:
    sink_url = f"sqlite:///{tmp_path}/records.db"
    publish_dead(broker_url, [(b"[]", "LLMLogRecord"), (encode(small_record(1)), "LLMLogRecord")])
    first = replay(broker_url, sink_url, tmp_path)
    assert first.returncode == 1
    second = replay(broker_url, sink_url, tmp_path)
    assert second.returncode == 1
    assert second.stdout.splitlines() == [
        "not written: dead letter 1 (no log_id): not a valid LLMLogRecord: Expected `object`, got `array`",
        "0 records and scores written to the sink and removed from multillm.dead (0 of them were stored already);"
        " left in multillm.dead: 1 not written, 0 other dead letters",
    ]


def test_replay_of_an_empty_queue_writes_nothing(broker_url: str, tmp_path: Path) -> None:
    done = replay(broker_url, f"jsonl:///{tmp_path}/records.jsonl", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("0 records and scores written")


def test_replay_without_a_broker_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = replay(f"amqp://guest:pw-secret@127.0.0.1:{port}/%2F", f"sqlite:///{tmp_path}/records.db", tmp_path)
    assert done.returncode == 1
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"multillm: cannot reach the broker at amqp://guest:***@127.0.0.1:{port}/%2F: ")
    assert "pw-secret" not in done.stderr and "Traceback" not in done.stderr

"""Any text a record carries is stored: U+0000 in prompts, answers, attributes and errors, on every sink.

PostgreSQL's JSONB and TEXT cannot hold U+0000: its JSON columns are JSON (which
keeps the escape `\\u0000`), a table made with JSONB columns is migrated on open,
and TEXT columns store U+FFFD in its place.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
import psycopg
import pytest

from multillm.mock_llm import MockControl
from multillm.producers import Client, make_request
from multillm.schemas import ChatMessage, LLMLogRecord, LogAttribute, V1ChatCompletionMessage, V1Choice
from multillm.sinks import RecordFilter, Sink, open_sink
from multillm.sinks._rows import LOGS, Kind
from multillm.sinks.postgres import DIALECT
from tests.broker_tools import read_dead_letters
from tests.conftest import StartWorker, empty_sink_url, wait_for_records
from tests.test_sinks import BACKENDS, as_stored, full_record

NUL = "\x00"


@pytest.fixture(params=BACKENDS)
def sink_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return empty_sink_url(request.param, tmp_path, request)


def nul_record(log_id: str = "log-nul", request_id: str = "req-nul") -> LLMLogRecord:
    """A record with U+0000 in every kind of column a provider or a caller could fill."""
    return msgspec.structs.replace(
        full_record(log_id, request_id),
        external_id=f"chatcmpl-{NUL}x",
        error_message=f"upstream said {NUL}{NUL} and stopped",
        messages=[ChatMessage(role="user", content=f"a{NUL}b \\u0000 {NUL}")],
        output=[V1Choice(index=0, message=V1ChatCompletionMessage(content=f"answer{NUL}with nul"))],
        log_attributes=[LogAttribute(key=f"k{NUL}", value=f"v{NUL}"), LogAttribute(key="exp", value="b")],
    )


def test_a_record_with_nul_everywhere_is_stored_and_read_back(sink_url: str, make_sink: Callable[[], Sink]) -> None:
    record = nul_record()
    assert make_sink().write(record) is True
    [back] = make_sink().records(record.request_id)
    # JSON columns keep U+0000 on every sink: the prompt and the answer are the ones given.
    assert back.messages == record.messages
    assert back.output == record.output
    assert back.log_attributes == record.log_attributes
    assert back == as_stored(record, sink_url)
    if sink_url.startswith("postgres"):
        assert back.error_message == "upstream said \ufffd\ufffd and stopped"


def test_a_batch_with_one_nul_record_stores_them_all(make_sink: Callable[[], Sink]) -> None:
    records = [full_record("log-a", "req-batch"), nul_record("log-b", "req-batch")]
    assert make_sink().write_many(records) == [True, True]
    assert [r.log_id for r in make_sink().records("req-batch")] == ["log-a", "log-b"]


def test_attribute_filter_reads_past_a_row_with_nul_attributes(make_sink: Callable[[], Sink]) -> None:
    sink = make_sink()
    plain = msgspec.structs.replace(full_record("log-plain", "req-plain"), log_attributes=[LogAttribute("exp", "b")])
    sink.write_many([nul_record(), plain])
    found = sink.records(where=RecordFilter(attributes={"exp": "b"}))
    assert sorted(r.log_id for r in found) == ["log-nul", "log-plain"]
    assert [r.log_id for r in sink.records(where=RecordFilter(attributes={"exp": "c"}))] == []


# --- PostgreSQL: a table made with JSONB columns ----------------------------------------------------------------

TRICKY = 'quote " backslash \\ tab \t newline \n bell \x07 del \x7f ünï ☃ \u2028 /slash'


# How earlier versions made the table and wrote to it.
OLD_DIALECT = dataclasses.replace(DIALECT, types={**DIALECT.types, Kind.JSON: "JSONB"}, json_param="%s::jsonb")


def jsonb_table(url: str) -> None:
    """The table as earlier versions made it (JSONB columns), with one row written the way they wrote it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS llm_logs")
        for statement in OLD_DIALECT.create_statements(LOGS):
            conn.execute(statement)
        conn.execute(OLD_DIALECT.insert_sql(LOGS), OLD_DIALECT.to_row(LOGS, old_record()))


def old_record() -> LLMLogRecord:
    return msgspec.structs.replace(
        full_record("log-old", "req-old"), log_attributes=[LogAttribute(TRICKY, TRICKY), LogAttribute("exp", "b")]
    )


def column_types(url: str) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'llm_logs'"
        ).fetchall()
    return dict(rows)


def test_a_jsonb_table_is_migrated_once_by_workers_opening_it_together(pg_database: str) -> None:
    jsonb_table(pg_database)
    assert column_types(pg_database)["messages"] == "jsonb"
    opened: list[Sink] = []
    failed: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(open_sink(pg_database))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not failed, failed
        types = column_types(pg_database)
        assert types["messages"] == types["output"] == types["log_attributes"] == "json"
        sink = opened[0]
        # The old row is kept, reads back as written, and its attributes still match filters.
        assert sink.records("req-old") == [old_record()]
        assert [r.log_id for r in sink.records(where=RecordFilter(attributes={TRICKY: TRICKY}))] == ["log-old"]
        assert sink.write(nul_record()) is True
        assert sink.records("req-nul")[0].messages == nul_record().messages
        # A worker of the earlier version, still running, keeps writing: PostgreSQL casts its JSONB to JSON.
        late = msgspec.structs.replace(old_record(), log_id="log-zlate")
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute(OLD_DIALECT.insert_sql(LOGS), OLD_DIALECT.to_row(LOGS, late))
        matched = sink.records(where=RecordFilter(attributes={"exp": "b"}))
        assert [r.log_id for r in matched] == ["log-nul", "log-old", "log-zlate"]
        assert matched[2] == late
    finally:
        for s in opened:
            s.close()


def test_reading_a_jsonb_table_does_not_migrate_it(pg_database: str) -> None:
    jsonb_table(pg_database)
    sink = open_sink(pg_database, read_only=True)
    try:
        assert sink.records("req-old") == [old_record()]
        assert [r.log_id for r in sink.records(where=RecordFilter(attributes={"exp": "b"}))] == ["log-old"]
    finally:
        sink.close()
    assert column_types(pg_database)["messages"] == "jsonb"


# --- the pipeline: a model's answer with U+0000 ends in PostgreSQL ---------------------------------------------


@pytest.mark.parametrize("sink_url", ["postgres"], indirect=True)
def test_an_answer_with_nul_from_a_real_worker_is_stored_in_postgres(
    start_worker: StartWorker, client: Client, sink: Sink, broker_url: str, mock_control: MockControl
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/beta")
    # The mock answers with the prompt's words: U+0000 is no whitespace, so the answers carry it.
    future = client.submit(make_request(["mock/alpha", "mock/beta"], f"hello{NUL}world"))
    reply = future.result(timeout=30)
    assert reply.text == f"alpha says: hello{NUL}world"

    records = wait_for_records(sink, future.request_id, 2)
    assert [r.status for r in records] == ["ok", "ok"]
    assert [r.output[0].message.content for r in records if r.output] == [
        f"alpha says: hello{NUL}world",
        f"beta says: hello{NUL}world",
    ]
    assert all(r.messages[0].content == f"hello{NUL}world" for r in records)
    # Stored, not dead-lettered.
    assert read_dead_letters(broker_url, 1, timeout=0.5) == []

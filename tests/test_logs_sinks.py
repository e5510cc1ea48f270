"""`write_many` and `RecordFilter` against every real sink: a JSON Lines file, an SQLite file, PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import psycopg
import pytest

from multillm.schemas import ChatMessage, LLMLogRecord, LogAttribute
from multillm.sinks import RecordFilter, Sink, open_sink, parse_bound

every_sink = pytest.mark.parametrize("sink_url", ["jsonl", "sqlite", "postgres"], indirect=True)


def record(
    log_id: str,
    *,
    request_id: str = "req-1",
    model: str = "mock/a",
    index: int = 0,
    created_at: str = "2026-11-25T01:45:24.123Z",
    **fields: object,
) -> LLMLogRecord:
    return LLMLogRecord(
        log_id=log_id,
        request_id=request_id,
        model_name=model,
        model_index=index,
        is_primary=index == 0,
        messages=[ChatMessage(role="user", content=f"prompt of {log_id}")],
        created_at=created_at,
        **fields,  # type: ignore[arg-type]
    )


# --- write_many ------------------------------------------------------------------------------


@every_sink
def test_write_many_stores_a_batch_and_says_which_were_new(sink: Sink) -> None:
    batch = [record(f"log-{i}", index=i) for i in range(5)]
    assert sink.write_many(batch) == [True] * 5
    assert sink.records() == batch
    again = [record("log-new", index=9), *batch[:2]]
    assert sink.write_many(again) == [True, False, False]
    assert [r.log_id for r in sink.records()] == ["log-0", "log-1", "log-2", "log-3", "log-4", "log-new"]


@every_sink
def test_write_many_keeps_the_first_copy_of_an_id_named_twice_in_a_batch(sink: Sink) -> None:
    first = record("dup", latency_ms=1.0)
    second = msgspec.structs.replace(first, latency_ms=2.0, status="error")
    assert sink.write_many([first, record("other", index=1), second]) == [True, True, False]
    assert sink.records() == [first, record("other", index=1)]


@every_sink
def test_write_many_against_records_stored_by_write_and_by_another_sink(
    sink: Sink, make_sink: Callable[[], Sink]
) -> None:
    assert sink.write(record("a")) is True
    other = make_sink()
    assert other.write_many([record("a"), record("b", index=1)]) == [False, True]
    assert sink.write_many([record("b", index=1), record("c", index=2)]) == [False, True]
    assert sink.write(record("c", index=2)) is False
    assert [r.log_id for r in other.records()] == ["a", "b", "c"]


@every_sink
def test_write_many_of_nothing(sink: Sink) -> None:
    assert sink.write_many([]) == []
    assert sink.records() == []


# --- filters ---------------------------------------------------------------------------------

STORED = [
    record(
        "r1-a",
        request_id="r1",
        model="mock/a",
        index=0,
        created_at="2026-11-24T23:59:59.999Z",
        mode="MODE_PROD",
        trace_id="t1",
        session_id="s1",
        log_attributes=[LogAttribute(key="team", value="search"), LogAttribute(key="exp", value="x")],
    ),
    record(
        "r1-b",
        request_id="r1",
        model="mock/b",
        index=1,
        created_at="2026-11-25T00:00:00.000Z",
        mode="MODE_PROD",
        trace_id="t1",
        session_id="s1",
        log_attributes=[LogAttribute(key="team", value="search")],
    ),
    record(
        "r2-a",
        request_id="r2",
        model="mock/a",
        index=0,
        created_at="2026-11-25T12:30:00.500Z",
        mode="MODE_TEST",
        trace_id="t2",
        log_attributes=[LogAttribute(key="team", value="ads"), LogAttribute(key="exp", value="x")],
    ),
    # Another spelling of UTC than the workers write: bounds must still order it by time.
    record("r3-b", request_id="r3", model="mock/b", index=1, created_at="2026-11-26T08:00:00+00:00", mode="MODE_TEST"),
]


@every_sink
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (RecordFilter(), ["r1-a", "r1-b", "r2-a", "r3-b"]),
        (RecordFilter(mode="MODE_TEST"), ["r2-a", "r3-b"]),
        (RecordFilter(model_name="mock/a"), ["r1-a", "r2-a"]),
        (RecordFilter(trace_id="t1"), ["r1-a", "r1-b"]),
        (RecordFilter(session_id="s1"), ["r1-a", "r1-b"]),
        (RecordFilter(request_id="r2"), ["r2-a"]),
        (RecordFilter(attributes={"team": "search"}), ["r1-a", "r1-b"]),
        (RecordFilter(attributes={"team": "search", "exp": "x"}), ["r1-a"]),
        (RecordFilter(attributes={"exp": "x"}), ["r1-a", "r2-a"]),
        (RecordFilter(attributes={"team": "x"}), []),
        (RecordFilter(since=parse_bound("2026-11-25")), ["r1-b", "r2-a", "r3-b"]),
        (RecordFilter(until=parse_bound("2026-11-25")), ["r1-a"]),
        (RecordFilter(until=parse_bound("2026-11-25", end_of_day=True)), ["r1-a", "r1-b", "r2-a"]),
        (RecordFilter(since=parse_bound("2026-11-25T12:30:00.5Z")), ["r2-a", "r3-b"]),
        (RecordFilter(since=parse_bound("2026-11-25T12:30:00.501Z")), ["r3-b"]),
        (RecordFilter(since=parse_bound("2026-11-26T09:00+01:00")), ["r3-b"]),
        (RecordFilter(since=parse_bound("2026-11-26T08:00:00.001")), []),
        (RecordFilter(since=parse_bound("2026-11-25"), until=parse_bound("2026-11-26")), ["r1-b", "r2-a"]),
        (RecordFilter(model_name="mock/b", mode="MODE_PROD"), ["r1-b"]),
        (RecordFilter(model_name="mock/a", limit=1), ["r1-a"]),
        (RecordFilter(model_name="nope"), []),
    ],
    ids=lambda v: msgspec.json.encode(v).decode() if isinstance(v, RecordFilter) else None,
)
def test_each_filter_selects_the_same_records_on_every_sink(
    sink: Sink, query: RecordFilter, expected: list[str]
) -> None:
    assert sink.write_many(STORED) == [True] * len(STORED)
    selected = sink.records(where=query)
    assert [r.log_id for r in selected] == expected
    # The Python statement of the filter agrees with what the sink selected.
    in_python = [r.log_id for r in STORED if query.matches(r)][: query.limit]
    assert in_python == expected
    assert selected == [r for r in STORED if r.log_id in expected]


@every_sink
def test_positional_request_id_and_limit_narrow_a_filter(sink: Sink) -> None:
    sink.write_many(STORED)
    assert [r.log_id for r in sink.records("r1")] == ["r1-a", "r1-b"]
    assert [r.log_id for r in sink.records("r1", where=RecordFilter(model_name="mock/b"))] == ["r1-b"]
    assert [r.log_id for r in sink.records(limit=2, where=RecordFilter(limit=3))] == ["r1-a", "r1-b"]


@every_sink
def test_filter_values_are_parameters_not_sql(sink: Sink) -> None:
    sink.write_many(STORED)
    hostile = "x' OR '1'='1"
    assert sink.records(where=RecordFilter(model_name=hostile)) == []
    assert sink.records(where=RecordFilter(attributes={hostile: hostile})) == []
    assert len(sink.records()) == len(STORED)


# --- bounds and schema ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "end_of_day", "bound"),
    [
        ("2026-11-25", False, "2026-11-25T00:00:00"),
        ("2026-11-25", True, "2026-11-26T00:00:00"),
        ("2026-11-25T01:45", False, "2026-11-25T01:45:00"),
        ("2026-11-25T01:45:24.120Z", False, "2026-11-25T01:45:24.12"),
        ("2026-11-25T01:45:24.123456", False, "2026-11-25T01:45:24.123"),
        ("2026-11-25T03:45:24+02:00", True, "2026-11-25T01:45:24"),
    ],
)
def test_parse_bound(text: str, end_of_day: bool, bound: str) -> None:
    assert parse_bound(text, end_of_day=end_of_day) == bound


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "", "25/11/2026"])
def test_parse_bound_rejects_what_is_not_iso(text: str) -> None:
    with pytest.raises(ValueError, match="not an ISO-8601 date"):
        parse_bound(text)


@pytest.mark.parametrize("sink_url", ["postgres"], indirect=True)
def test_postgres_table_has_json_and_the_indexes(sink: Sink, pg_database: str) -> None:
    open_sink(pg_database).close()  # creating again keeps what is there
    with psycopg.connect(pg_database, autocommit=True) as conn:
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'llm_logs'"
            ).fetchall()
        )
        indexdefs = [r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'llm_logs'")]
    assert types["messages"] == types["output"] == types["log_attributes"] == "json"
    for column in ("request_id", "trace_id", "model_name", "created_at"):
        assert any(f"({column}" in d for d in indexdefs), (column, indexdefs)

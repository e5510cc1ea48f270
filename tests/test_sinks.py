"""The sinks against their real backends: a JSON Lines file, an SQLite file, a PostgreSQL server.

PostgreSQL is expected at $MULTILLM_TEST_POSTGRES_URL (default: user postgres on
127.0.0.1:5432, trust auth); the tests create a database of their own and drop it.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multillm.errors import ConfigError
from multillm.schemas import (
    ChatMessage,
    LLMLogRecord,
    LogAttribute,
    Mode,
    Role,
    ToolCall,
    ToolCallFunction,
    V1ChatCompletionMessage,
    V1Choice,
    decode_record,
)
from multillm.sinks import Sink, mask_url, open_sink
from tests.conftest import empty_sink_url

BACKENDS = ["jsonl", "sqlite", "postgres"]
FIELDS = msgspec.structs.fields(LLMLogRecord)


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def sink_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty sink of each kind."""
    return empty_sink_url(request.param, tmp_path, request)


@pytest.fixture
def sink(make_sink: Callable[[], Sink]) -> Sink:
    return make_sink()


# --- records -------------------------------------------------------------------


def full_record(log_id: str = "log-1", request_id: str = "req-1", model_index: int = 1) -> LLMLogRecord:
    """A record in which every field differs from its default."""
    return LLMLogRecord(
        log_id=log_id,
        request_id=request_id,
        model_name="openai/gpt-4o-mini",
        model_index=model_index,
        is_primary=True,
        external_id="chatcmpl-abc123",
        status="error",
        error_code=14,
        error_message="upstream 503 after 4 attempts",
        messages=[
            ChatMessage(role="system", content='Be brief. ünïcödé ☃ "quoted"\nsecond line\u2028'),
            ChatMessage(role="user", content=[{"type": "text", "text": "hi", "n": 3, "ok": True}], name="ann"),
            ChatMessage(
                role="assistant",
                tool_calls=[ToolCall(id="call_1", function=ToolCallFunction(name="f", arguments='{"x":1}'))],
            ),
            ChatMessage(role="tool", content="42", tool_call_id="call_1"),
        ],
        temperature=0.7,
        max_tokens=256,
        output=[
            V1Choice(index=0, message=V1ChatCompletionMessage(content="Hello!"), finish_reason="stop"),
            V1Choice(
                index=1,
                message=V1ChatCompletionMessage(tool_calls=[ToolCall(id="call_2", type="function")]),
                finish_reason="tool_calls",
            ),
        ],
        prompt_tokens=12,
        completion_tokens=34,
        total_tokens=46,
        cached_tokens=8,
        reasoning_tokens=20,
        cost_usd=0.0001234,
        latency_ms=123.456,
        time_to_first_token_ms=45.678,
        attempts=3,
        session_id="session-1",
        trace_id="trace-1",
        span_id="span-1",
        parent_span_id="span-0",
        user_id="user-7",
        mode="MODE_STAGING",
        log_attributes=[
            LogAttribute(key="experiment", value="a/b"),
            LogAttribute(key="team", value="search"),
        ],
        created_at="2024-05-01T12:00:00.000001+00:00",
        completed_at="2024-05-01T12:00:01.500000+00:00",
    )


def small_record(i: int, payload: str = "") -> LLMLogRecord:
    return LLMLogRecord(
        log_id=f"log-{i:05d}",
        request_id=f"req-{i // 4}",
        model_name="mock/echo",
        model_index=i % 4,
        is_primary=i % 4 == 0,
        messages=[ChatMessage(role="user", content=payload or f"prompt {i}")],
        created_at=f"2024-05-01T12:00:{i % 60:02d}+00:00",
    )


def test_full_record_sets_every_field() -> None:
    record = full_record()
    for field in FIELDS:
        default = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
        assert getattr(record, field.name) != default, field.name


# --- every sink ----------------------------------------------------------------------


def test_is_a_sink(sink: Sink) -> None:
    assert isinstance(sink, Sink)


def test_round_trip_of_a_full_record(make_sink: Callable[[], Sink]) -> None:
    record = full_record()
    sink = make_sink()
    assert sink.write(record) is True
    assert sink.records() == [record]
    sink.close()
    # A new sink on the same URL reads what the first one stored.
    assert make_sink().records(request_id="req-1") == [record]


def test_write_is_idempotent_on_log_id(sink: Sink) -> None:
    first = full_record()
    assert sink.write(first) is True
    assert sink.write(first) is False
    assert sink.write(msgspec.structs.replace(first, status="ok", attempts=1)) is False
    assert sink.records() == [first]


def test_records_filters_orders_and_limits(sink: Sink) -> None:
    a0 = full_record("a0", "req-a", 0)
    a1 = full_record("a1", "req-a", 1)
    b0 = msgspec.structs.replace(full_record("b0", "req-b", 0), created_at="2024-05-01T11:00:00+00:00")
    b2 = msgspec.structs.replace(full_record("b2", "req-b", 2), created_at="2024-05-01T11:00:00+00:00")
    b1 = msgspec.structs.replace(full_record("b1", "req-b", 1), created_at="2024-05-01T11:00:00+00:00")
    for record in (a1, b2, a0, b1, b0):
        assert sink.write(record)
    assert sink.records(request_id="req-a") == [a0, a1]
    assert sink.records(request_id="req-b") == [b0, b1, b2]
    assert sink.records(request_id="req-none") == []
    assert sink.records() == [b0, b1, b2, a0, a1]
    assert sink.records(limit=2) == [b0, b1]
    assert sink.records(request_id="req-a", limit=1) == [a0]


def test_two_sinks_on_one_store_see_each_others_writes(make_sink: Callable[[], Sink]) -> None:
    first, second = make_sink(), make_sink()
    assert first.write(small_record(1))
    assert second.write(small_record(1)) is False
    assert second.write(small_record(2))
    assert first.write(small_record(2)) is False
    assert [r.log_id for r in first.records()] == ["log-00001", "log-00002"]


def test_concurrent_threads_write_each_id_once(sink: Sink) -> None:
    threads, per_thread, stride = 8, 50, 25  # thread t writes ids t*25 .. t*25+49: neighbours overlap
    barrier = threading.Barrier(threads)
    wins = [0] * threads
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            barrier.wait(timeout=30)
            for i in range(t * stride, t * stride + per_thread):
                wins[t] += sink.write(small_record(i))
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    expected = {f"log-{i:05d}" for i in range((threads - 1) * stride + per_thread)}
    stored = [r.log_id for r in sink.records()]
    assert len(stored) == len(expected)
    assert set(stored) == expected
    assert sum(wins) == len(expected)  # every id was reported written exactly once


def _write_range(url: str, start: int, count: int, payload: str, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: write ids start..start+count-1, report how many were new."""
    sink = open_sink(url)
    try:
        barrier.wait(timeout=60)
        written = sum(sink.write(small_record(i, payload)) for i in range(start, start + count))
    finally:
        sink.close()
    results.put(written)


def test_concurrent_processes_write_each_id_once(sink_url: str) -> None:
    processes, per_process, stride = 4, 100, 50
    # Lines far longer than PIPE_BUF and a page, so interleaved appends would show as torn lines.
    payload = "x" * 20_000
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_write_range, args=(sink_url, p * stride, per_process, payload, barrier, results))
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    wins = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    expected = {f"log-{i:05d}" for i in range((processes - 1) * stride + per_process)}
    assert sum(wins) == len(expected)
    sink = open_sink(sink_url)
    try:
        stored = [r.log_id for r in sink.records()]
    finally:
        sink.close()
    assert len(stored) == len(expected)
    assert set(stored) == expected
    if sink_url.startswith("jsonl:"):
        lines = Path(sink_url.removeprefix("jsonl:///")).read_bytes().split(b"\n")
        assert lines[-1] == b""
        decoded = [decode_record(line) for line in lines[:-1]]  # raises on a torn line
        assert sorted(r.log_id for r in decoded) == sorted(expected)


# --- property: any record survives a round trip --------------------------------------


def as_stored(record: LLMLogRecord, sink_url: str) -> LLMLogRecord:
    """What the sink at `sink_url` gives back of `record`: the same, but for U+0000 in a TEXT
    column of PostgreSQL, which is stored as U+FFFD (JSON columns keep it)."""
    if not sink_url.startswith("postgres"):
        return record
    changes = {
        f.name: value.replace("\x00", "\ufffd") for f in FIELDS if isinstance(value := getattr(record, f.name), str)
    }
    return msgspec.structs.replace(record, **changes)


def record_strategy() -> st.SearchStrategy[LLMLogRecord]:
    """Arbitrary records, U+0000 included."""
    chars = st.characters(blacklist_categories=["Cs"])
    text = st.text(chars, max_size=30)
    opt_text = st.none() | text
    i64 = st.integers(-(2**63), 2**63 - 1)
    opt_i64 = st.none() | i64
    opt_float = st.none() | st.floats(allow_nan=False, allow_infinity=False)
    json_scalar = st.none() | st.booleans() | st.integers(-(10**9), 10**9) | text
    tool_call = st.builds(
        ToolCall,
        id=text,
        type=text,
        function=st.none() | st.builds(ToolCallFunction, name=text, arguments=text),
    )
    tool_calls = st.none() | st.lists(tool_call, max_size=2)
    message = st.builds(
        ChatMessage,
        role=st.sampled_from(get_args(Role)),
        content=st.none() | text | st.lists(st.dictionaries(text, json_scalar, max_size=3), max_size=2),
        name=opt_text,
        tool_calls=tool_calls,
        tool_call_id=opt_text,
    )
    choice = st.builds(
        V1Choice,
        index=st.integers(0, 100),
        message=st.builds(V1ChatCompletionMessage, role=text, content=opt_text, tool_calls=tool_calls),
        finish_reason=opt_text,
    )
    fields: dict[str, st.SearchStrategy[Any]] = {
        "log_id": text,
        "request_id": text,
        "model_name": text,
        "model_index": i64,
        "is_primary": st.booleans(),
        "external_id": opt_text,
        "status": st.sampled_from(["ok", "error"]),
        "error_code": opt_i64,
        "error_message": opt_text,
        "messages": st.lists(message, max_size=3),
        "temperature": opt_float,
        "max_tokens": opt_i64,
        "output": st.none() | st.lists(choice, max_size=2),
        "prompt_tokens": opt_i64,
        "completion_tokens": opt_i64,
        "total_tokens": opt_i64,
        "cached_tokens": opt_i64,
        "reasoning_tokens": opt_i64,
        "cost_usd": opt_float,
        "latency_ms": opt_float,
        "time_to_first_token_ms": opt_float,
        "attempts": i64,
        "session_id": opt_text,
        "trace_id": opt_text,
        "span_id": opt_text,
        "parent_span_id": opt_text,
        "user_id": opt_text,
        "mode": st.sampled_from(get_args(Mode)),
        "log_attributes": st.lists(st.builds(LogAttribute, key=text, value=text), max_size=3),
        "created_at": text,
        "completed_at": text,
    }
    # A field added to the record must be added here too, or this property stops covering it.
    assert set(fields) == {f.name for f in FIELDS}
    return st.builds(LLMLogRecord, **fields)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_record_round_trips(sink: Sink, sink_url: str, data: st.DataObject) -> None:
    drawn = data.draw(record_strategy())
    # Fresh ids: the examples share one sink.
    record = msgspec.structs.replace(drawn, log_id=uuid.uuid4().hex, request_id=uuid.uuid4().hex)
    assert sink.write(record) is True
    assert sink.records(request_id=record.request_id) == [as_stored(record, sink_url)]


# --- backend specifics ---------------------------------------------------------------


def test_jsonl_write_after_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "logs.jsonl"
    sink = open_sink(f"jsonl:///{path}")
    try:
        assert sink.write(small_record(1))
        with path.open("ab") as f:  # a writer that died mid-line
            f.write(b'{"log_id": "log-00002", "request_')
        assert sink.write(small_record(2))
        assert sink.write(small_record(2)) is False
        assert sink.write(small_record(3))
        assert [r.log_id for r in sink.records()] == ["log-00001", "log-00002", "log-00003"]
    finally:
        sink.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"log_id": "log-00002", "request_'  # the torn line stays on its own line
    assert [decode_record(line).log_id for line in (lines[0], lines[2], lines[3])] == [
        "log-00001",
        "log-00002",
        "log-00003",
    ]


def test_jsonl_lines_are_snake_case_records(tmp_path: Path) -> None:
    path = tmp_path / "logs.jsonl"
    sink = open_sink(f"jsonl:///{path}")
    try:
        sink.write(full_record())
    finally:
        sink.close()
    obj = msgspec.json.decode(path.read_bytes())
    assert list(obj) == [f.name for f in FIELDS]


def test_sqlite_schema_matches_the_record(tmp_path: Path) -> None:
    path = tmp_path / "logs.db"
    open_sink(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        columns = conn.execute("PRAGMA table_info(llm_logs)").fetchall()
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(llm_logs)")}
        indexed = {conn.execute(f"PRAGMA index_info({name})").fetchone()[2] for name in indexes}
        journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert [c[1] for c in columns] == [f.name for f in FIELDS]
    assert [c[1] for c in columns if c[5]] == ["log_id"]  # the primary key
    assert {"request_id", "trace_id", "log_id"} <= indexed
    assert journal_mode == "wal"


def test_postgres_schema_matches_the_record(pg_database: str) -> None:
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS llm_logs")
        open_sink(pg_database).close()
        open_sink(pg_database).close()  # a second open finds the table and keeps it
        columns = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'llm_logs' ORDER BY ordinal_position"
        ).fetchall()
        indexdefs = [
            r[0]
            for r in conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'llm_logs'"
            )
        ]
    assert [c[0] for c in columns] == [f.name for f in FIELDS]
    types: dict[str, str] = {c[0]: c[1] for c in columns}
    # JSON, not JSONB: JSONB refuses the escape \u0000 (test_sink_text.py).
    assert types["messages"] == types["output"] == types["log_attributes"] == "json"
    assert types["is_primary"] == "boolean"
    assert any("(request_id)" in d for d in indexdefs)
    assert any("(trace_id)" in d for d in indexdefs)


def test_postgres_scheme_alias(pg_database: str) -> None:
    alias = pg_database.replace("postgresql://", "postgres://", 1)
    sink = open_sink(alias)
    try:
        assert isinstance(sink.records(), list)
    finally:
        sink.close()


def test_postgres_without_psycopg_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes `import psycopg` fail
    with pytest.raises(ConfigError, match=r"pip install 'multillm\[postgres\]'"):
        open_sink("postgresql://postgres@127.0.0.1:5432/postgres")


def test_sqlite_in_memory() -> None:
    sink = open_sink("sqlite://")
    try:
        assert sink.write(full_record())
        assert sink.records() == [full_record()]
    finally:
        sink.close()


# --- URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["sqlite", "jsonl"])
def test_file_urls_read_as_sqlalchemy_does(scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    workdir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(workdir)
    relative = open_sink(f"{scheme}:///rel/logs.{scheme}")
    absolute = open_sink(f"{scheme}:///{tmp_path}/abs/logs.{scheme}")  # four slashes in all
    assert f"{scheme}:///{tmp_path}".startswith(f"{scheme}:////")
    monkeypatch.chdir(elsewhere)  # a later change of folder does not move the file
    try:
        relative.write(small_record(1))
        absolute.write(small_record(2))
    finally:
        relative.close()
        absolute.close()
    assert (workdir / "rel" / f"logs.{scheme}").is_file()
    assert (tmp_path / "abs" / f"logs.{scheme}").is_file()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@localhost:6379/0", "redis://user:***@localhost:6379/0"),
        ("mysql://root:s3cret@db/logs", "mysql://root:***@db/logs"),
        ("file:///tmp/logs.db", "file:///tmp/logs.db"),
    ],
)
def test_unknown_scheme_names_the_url_without_password(url: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_sink(url)
    assert shown in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "not a url",
        "/tmp/logs.db",
        "user:s3cret@host/db",
        "sqlite://somehost/logs.db",
        "jsonl://",
        "jsonl:///",
        "sqlite:///logs.db?mode=ro",
        "postgresql://user:s3cret@localhost:notaport/db",
    ],
)
def test_malformed_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_sink(url)
    assert "s3cret" not in str(info.value)
    if url:
        assert mask_url(url) in str(info.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@host:5432/db", "postgresql://u:***@host:5432/db"),
        ("postgresql://u@host/db", "postgresql://u@host/db"),
        ("postgresql://u:p/w@d@host/db", "postgresql://u:***@host/db"),
        (
            "postgresql://host/db?user=u&password=pw&sslmode=require",
            "postgresql://host/db?user=u&password=***&sslmode=require",
        ),
        ("sqlite:///a@b.db", "sqlite:///a@b.db"),
        ("user:pw@host/db", "user:***@host/db"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_sqlite_sink_opens_while_another_process_writes_to_a_fresh_file(tmp_path: Path) -> None:
    # `make demo` starts four workers on a new file at once: while one creates the table, another's
    # switch to WAL got "database is locked" at once (SQLite skips its busy handler there).
    path = tmp_path / "fresh.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE elsewhere (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO elsewhere VALUES (1)")
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    sink = open_sink(f"sqlite:///{path}")
    try:
        assert sink.write(small_record(1))
        assert [r.log_id for r in sink.records()] == [small_record(1).log_id]
    finally:
        sink.close()
        other.close()

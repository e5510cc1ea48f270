"""Opening a sink through the real CLI: a worker whose sink cannot be opened, and `multillm logs` choosing
which sink it reads and never creating or changing one."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from multillm.config import ENV_BROKER_URL, ENV_CONFIG, ENV_SINK_URL
from multillm.errors import ConfigError
from multillm.sinks import open_sink
from tests.conftest import empty_sink_url
from tests.test_sinks import small_record

PASSWORD = "s3cret-pw"


def multillm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m multillm ARGS` in `cwd`, with no settings but those of `env`."""
    base = {k: v for k, v in os.environ.items() if k not in (ENV_SINK_URL, ENV_CONFIG, ENV_BROKER_URL)}
    return subprocess.run(
        [sys.executable, "-m", "multillm", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_config_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a configuration error (exit 2, no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("multillm: configuration error: ")
    assert "Traceback" not in done.stderr
    return lines[0]


def with_password(url: str) -> str:
    """`url` with a password (trust authentication ignores it)."""
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- a worker whose sink cannot be opened: one line, exit 2 -------------------------------------------------


def read_only_folder(tmp_path: Path) -> Path:
    """A folder in which nothing can be created, even by root (which ignores file modes)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    # sysfs refuses to create files for anyone.
    return Path("/sys/multillm-test")


@pytest.mark.parametrize("scheme", ["sqlite", "jsonl"])
def test_worker_with_a_sink_in_a_read_only_folder_is_a_config_error(tmp_path: Path, scheme: str) -> None:
    path = read_only_folder(tmp_path) / "logs" / "records.db"
    url = f"{scheme}:///{path}"
    line = one_line_config_error(
        multillm("worker", "model", "--model", "mock/beta", cwd=tmp_path, env={ENV_SINK_URL: url})
    )
    assert f"cannot open sink {url}: " in line
    assert str(path.parent.parent) in line  # the cause names what could not be created


def test_worker_with_a_postgres_that_does_not_answer_is_a_config_error(tmp_path: Path) -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{unused_port()}/multillm"
    line = one_line_config_error(multillm("worker", "primary", cwd=tmp_path, env={ENV_SINK_URL: url}))
    assert "cannot open sink postgresql://postgres:***@127.0.0.1:" in line
    assert "Connection refused" in line
    assert PASSWORD not in line


def test_worker_with_a_missing_database_is_a_config_error(tmp_path: Path, pg_database: str) -> None:
    url = with_password(pg_database.rpartition("/")[0] + "/multillm_no_such_database")
    line = one_line_config_error(
        multillm("worker", "model", "--model", "mock/beta", cwd=tmp_path, env={ENV_SINK_URL: url})
    )
    assert 'database "multillm_no_such_database" does not exist' in line
    assert "postgres:***@" in line and PASSWORD not in line


# --- `multillm logs`: which sink, and reading never creates or changes one -------------------------------------


@pytest.mark.parametrize("action", [["list"], ["stats"], ["show", "req-0"], ["report", "--html", "r.html"]])
def test_logs_in_an_empty_folder_say_the_default_sink_is_missing_and_create_nothing(
    tmp_path: Path, action: list[str]
) -> None:
    line = one_line_config_error(multillm("logs", *action, cwd=tmp_path))
    assert f"no SQLite sink at {tmp_path}/multillm-logs.db" in line
    assert "--sink URL" in line and ENV_SINK_URL in line
    assert list(tmp_path.iterdir()) == []


def test_logs_of_a_missing_jsonl_file_name_it(tmp_path: Path) -> None:
    url = "jsonl:///elsewhere/records.jsonl"
    line = one_line_config_error(multillm("logs", "list", cwd=tmp_path, env={ENV_SINK_URL: url}))
    assert f"no JSON Lines sink at {tmp_path}/elsewhere/records.jsonl" in line
    assert list(tmp_path.iterdir()) == []


def test_logs_sink_option_wins_over_the_environment_and_the_config_file(tmp_path: Path) -> None:
    sink = open_sink(f"sqlite:///{tmp_path}/right.db")
    sink.write(small_record(1))
    sink.close()
    config = tmp_path / "multillm.toml"
    config.write_text('sink_url = "sqlite:///from-config.db"\n')
    env = {ENV_SINK_URL: "sqlite:///from-env.db", ENV_CONFIG: str(config)}

    done = multillm("logs", "list", "--json", "--sink", "sqlite:///right.db", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert '"request_id": "req-0"' in done.stdout
    assert done.stderr.splitlines() == [f"multillm: reading sink sqlite:///right.db (file {tmp_path}/right.db)"]

    # Without --sink the environment wins over the file: its sink is named as missing.
    line = one_line_config_error(multillm("logs", "list", cwd=tmp_path, env=env))
    assert f"{tmp_path}/from-env.db" in line
    assert not (tmp_path / "from-env.db").exists() and not (tmp_path / "from-config.db").exists()


@pytest.mark.parametrize("sink_url", ["postgres"], indirect=True)
def test_logs_name_the_postgres_sink_with_its_password_masked(tmp_path: Path, sink_url: str) -> None:
    sink = open_sink(sink_url)
    sink.write(small_record(1))
    sink.close()
    done = multillm("logs", "stats", "--sink", with_password(sink_url), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [line] = done.stderr.splitlines()
    assert line == f"multillm: reading sink {with_password(sink_url).replace(PASSWORD, '***')}"
    assert "mock/echo" in done.stdout


def test_reading_an_sqlite_file_without_the_table_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).close()  # an empty database: some other program's, or a typo's
    before = path.read_bytes()
    line = one_line_config_error(multillm("logs", "list", "--sink", f"sqlite:///{path}", cwd=tmp_path))
    assert f"{path} is an SQLite file without a table llm_logs" in line
    assert path.read_bytes() == before


def test_reading_a_postgres_database_without_the_table_creates_none(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = empty_sink_url("postgres", tmp_path, request)  # the table dropped
    line = one_line_config_error(multillm("logs", "list", "--sink", url, cwd=tmp_path))
    assert "no table llm_logs in" in line
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('llm_logs')").fetchone() == (None,)


@pytest.mark.parametrize("sink_url", ["jsonl", "sqlite", "postgres"], indirect=True)
def test_a_sink_opened_read_only_refuses_writes(sink_url: str) -> None:
    open_sink(sink_url).close()  # created by a writer
    reader = open_sink(sink_url, read_only=True)
    try:
        with pytest.raises((PermissionError, sqlite3.OperationalError, psycopg.errors.ReadOnlySqlTransaction)):
            reader.write(small_record(1))
    finally:
        reader.close()
    writer = open_sink(sink_url)
    try:
        assert writer.records() == []
    finally:
        writer.close()


def test_read_only_open_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path}/no.db", f"jsonl:///{tmp_path}/no.jsonl"):
        with pytest.raises(ConfigError, match="the file does not exist"):
            open_sink(url, read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_a_password_in_the_query_string_is_masked_in_the_error() -> None:
    # libpq quotes the value it cannot read; the URL's masking covers the query, the cause must too.
    with pytest.raises(ConfigError) as refused:
        open_sink("postgresql://u@127.0.0.1:1/db?password=s3cr%zzet", read_only=True)
    assert "s3cr" not in str(refused.value) and "password=***" in str(refused.value)


def test_a_read_only_postgres_sink_keeps_the_urls_own_options(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = empty_sink_url("postgres", tmp_path, request)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS elsewhere CASCADE")
        conn.execute("CREATE SCHEMA elsewhere")
    in_schema = f"{url}?options=-csearch_path%3Delsewhere"
    try:
        writer = open_sink(in_schema)
        try:
            writer.write(small_record(1))
        finally:
            writer.close()
        reader = open_sink(in_schema, read_only=True)  # finds llm_logs through the URL's search_path
        try:
            assert [r.log_id for r in reader.records()] == [small_record(1).log_id]
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                reader.write(small_record(2))
        finally:
            reader.close()
    finally:  # the database is the run's: leave no second llm_logs for the other tests to find
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA elsewhere CASCADE")

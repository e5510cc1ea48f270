"""SQLite sink: tables `llm_logs` and `llm_scores` in one file that several worker processes share.

WAL mode lets readers run while a worker writes, and the busy timeout makes a
writer wait for another process's write instead of failing. Within a process,
one connection serves every thread, one statement at a time.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from multillm.errors import ConfigError
from multillm.schemas import LLMLogRecord, LLMScore
from multillm.sinks._rows import LOGS, SCORES, TABLES, Dialect, Kind, SqlReader, Table

BUSY_TIMEOUT_SECONDS: Final = 30.0
MEMORY: Final = ":memory:"


def _has_attribute(key: str, value: str) -> tuple[str, list[Any]]:
    return (
        "EXISTS (SELECT 1 FROM json_each(log_attributes) AS a"
        " WHERE json_extract(a.value, '$.key') = ? AND json_extract(a.value, '$.value') = ?)",
        [key, value],
    )


DIALECT: Final = Dialect(
    types={
        Kind.TEXT: "TEXT",
        Kind.INTEGER: "INTEGER",
        Kind.REAL: "REAL",
        Kind.BOOLEAN: "INTEGER",
        Kind.JSON: "TEXT",
    },
    param="?",
    json_param="?",
    json_select="{}",
    byte_order="",  # SQLite's default collation, BINARY, is byte order
    has_attribute=_has_attribute,
)
_INSERT: Final = DIALECT.insert_sql(LOGS)
_INSERT_SCORE: Final = DIALECT.insert_sql(SCORES)


class SqliteSink(SqlReader):
    """Records in an SQLite file (or `:memory:`). Thread-safe; safe across processes.

    Open one per process, after forking: an SQLite connection must not cross a fork.
    """

    system = "sqlite"

    _dialect = DIALECT

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        """Open (creating file, parent folders, tables and columns as needed) the database at `path`.

        With `read_only`, the file is opened for reading only and nothing is created or changed.

        Raises:
            ConfigError: `read_only` and there is no such file, or no table `llm_logs` in it.
            sqlite3.Error, OSError: the file or its folder cannot be created or opened.
        """
        self.path = str(path)
        self._lock = threading.Lock()
        if read_only:
            self._conn = self._open_read_only()
            return
        if self.path != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit (isolation_level=None): each insert is its own short write transaction,
        # so no process holds the write lock between statements.
        self._conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None
        )
        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        self._use_wal()
        # NORMAL is durable against process crashes in WAL mode; only an OS crash may lose the last commits.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        # One transaction, so that two workers opening an old file at once do not both add a column.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for table in TABLES:
                for statement in DIALECT.create_statements(table):
                    self._conn.execute(statement)
                for statement in DIALECT.add_column_statements(table, self._columns(self._conn, table)):
                    self._conn.execute(statement)
            self._conn.commit()
        except BaseException:
            self._conn.rollback()
            raise

    @staticmethod
    def _columns(conn: sqlite3.Connection, table: Table) -> set[str]:
        """The table's columns (none when there is no table)."""
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table.name})")}

    def _open_read_only(self) -> sqlite3.Connection:
        if self.path == MEMORY or not Path(self.path).is_file():
            raise ConfigError(f"no SQLite sink at {self.path}: the file does not exist")
        # mode=ro: SQLite itself refuses every write, so reading cannot create or change anything.
        conn = sqlite3.connect(
            f"file:{quote(self.path)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False
        )
        columns = self._columns(conn, LOGS)
        if not columns:
            conn.close()
            raise ConfigError(f"{self.path} is an SQLite file without a table {LOGS.name}: not a multillm sink")
        self._missing = LOGS.column_names - columns
        self._no_scores = not self._columns(conn, SCORES)
        return conn

    def _use_wal(self) -> None:
        # Switching a new file to WAL takes an exclusive lock, and SQLite can answer "database is
        # locked" at once, without its busy handler, while another process switches it or creates
        # the table: seen when `make demo` starts four workers on a fresh file.
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def write(self, record: LLMLogRecord) -> bool:
        """Insert `record`; False if a record with its `log_id` is already stored."""
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        """Insert `records` in one transaction; per record, False if its `log_id` was already stored
        (or came earlier in the batch)."""
        return self._insert(_INSERT, [DIALECT.to_row(LOGS, record) for record in records])

    def write_scores(self, scores: Sequence[LLMScore]) -> list[bool]:
        """Insert `scores` in one transaction; per score, False if its `score_id` was already stored."""
        return self._insert(_INSERT_SCORE, [DIALECT.to_row(SCORES, score) for score in scores])

    def _insert(self, sql: str, rows: list[tuple[object, ...]]) -> list[bool]:
        with self._lock:
            # IMMEDIATE takes the write lock up front: a deferred transaction that has to upgrade
            # later can fail with SQLITE_BUSY at once instead of waiting out the busy timeout.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # A later copy of a key in the batch conflicts with the first, so it reports False too.
                written = [self._conn.execute(sql, row).rowcount == 1 for row in rows]
                self._conn.commit()
            except BaseException:
                # Also after a failed COMMIT: a transaction left open would fail every later BEGIN.
                if self._conn.in_transaction:
                    self._conn.rollback()
                raise
        return written

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        """Close the connection; the sink cannot be used afterwards."""
        with self._lock:
            self._conn.close()

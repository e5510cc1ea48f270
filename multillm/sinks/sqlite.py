"""SQLite sink: table `llm_logs` in one file that several worker processes share.

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
from multillm.schemas import LLMLogRecord
from multillm.sinks._rows import COLUMN_NAMES, TABLE, Dialect, Kind, SqlReader

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
_INSERT: Final = DIALECT.insert_sql()


class SqliteSink(SqlReader):
    """Records in an SQLite file (or `:memory:`). Thread-safe; safe across processes.

    Open one per process, after forking: an SQLite connection must not cross a fork.
    """

    _dialect = DIALECT

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        """Open (creating file, parent folders and table as needed) the database at `path`.

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
            for statement in DIALECT.create_statements():
                self._conn.execute(statement)
            for statement in DIALECT.add_column_statements(self._columns(self._conn)):
                self._conn.execute(statement)
            self._conn.commit()
        except BaseException:
            self._conn.rollback()
            raise

    @staticmethod
    def _columns(conn: sqlite3.Connection) -> set[str]:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}

    def _open_read_only(self) -> sqlite3.Connection:
        if self.path == MEMORY or not Path(self.path).is_file():
            raise ConfigError(f"no SQLite sink at {self.path}: the file does not exist")
        # mode=ro: SQLite itself refuses every write, so reading cannot create or change anything.
        conn = sqlite3.connect(
            f"file:{quote(self.path)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False
        )
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone()
        if found is None:
            conn.close()
            raise ConfigError(f"{self.path} is an SQLite file without a table {TABLE}: not a multillm sink")
        self._missing = COLUMN_NAMES - self._columns(conn)
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
        rows = [DIALECT.to_row(record) for record in records]
        with self._lock:
            # IMMEDIATE takes the write lock up front: a deferred transaction that has to upgrade
            # later can fail with SQLITE_BUSY at once instead of waiting out the busy timeout.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # A later copy of an id in the batch conflicts with the first, so it reports False too.
                written = [self._conn.execute(_INSERT, row).rowcount == 1 for row in rows]
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

"""PostgreSQL sink: table `llm_logs`, through psycopg 3 (the `postgres` extra).

psycopg is imported when a sink is opened, so the package imports without it.
Timestamps are TEXT, as the record holds them: a TIMESTAMPTZ would not give
back the exact string that was written. JSON columns are JSONB, read back as
text and decoded by msgspec into the record's types.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

from multillm.errors import ConfigError
from multillm.schemas import LLMLogRecord, LogAttribute
from multillm.sinks._rows import TABLE, Dialect, Kind, SqlReader, to_row

if TYPE_CHECKING:
    import psycopg


def _has_attribute(key: str, value: str) -> tuple[str, list[Any]]:
    # Containment can use a GIN index on log_attributes, should a deployment add one.
    pair = msgspec.json.encode([LogAttribute(key=key, value=value)]).decode()
    return "log_attributes @> %s::jsonb", [pair]


DIALECT: Final = Dialect(
    types={
        Kind.TEXT: "TEXT",
        Kind.INTEGER: "BIGINT",
        Kind.REAL: "DOUBLE PRECISION",
        Kind.BOOLEAN: "BOOLEAN",
        Kind.JSON: "JSONB",
    },
    param="%s",
    json_param="%s::jsonb",
    json_select="{}::text",
    byte_order=' COLLATE "C"',
    has_attribute=_has_attribute,
)
_INSERT: Final = DIALECT.insert_sql(returning=True)
CONNECT_TIMEOUT_SECONDS: Final = 10


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("a postgresql:// sink needs psycopg: pip install 'multillm[postgres]'") from None
    return psycopg


class PostgresSink(SqlReader):
    """Records in PostgreSQL. Thread-safe: one autocommit connection, one statement at a time.

    A connection that broke (server restart, network) is replaced on the next call;
    the call that saw it break raises `psycopg.OperationalError`.
    """

    _dialect = DIALECT

    def __init__(self, url: str) -> None:
        """Connect to `url` (a libpq URL) and create the table and indexes if missing.

        Raises:
            ConfigError: psycopg is not installed.
            psycopg.OperationalError: the server cannot be reached or refuses the login.
        """
        self._psycopg = _psycopg()
        self._url = url
        self._lock = threading.Lock()
        self._conn = self._connect()
        with self._conn.transaction():
            # Serialise schema creation: concurrent `CREATE TABLE IF NOT EXISTS` can still
            # collide on the catalog when several workers start at once.
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"multillm.{TABLE}",))
            for statement in DIALECT.create_statements():
                self._conn.execute(statement)

    def _connect(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self._psycopg.connect(
            self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
        )
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        # Called with the lock held.
        if self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def write(self, record: LLMLogRecord) -> bool:
        """Insert `record`; False if a record with its `log_id` is already stored."""
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        """Insert `records` in one transaction; per record, False if its `log_id` was already stored
        (or came earlier in the batch).

        `executemany` runs in pipeline mode: one prepared insert per record, sent without
        waiting for each answer, so a batch costs about one round trip. `RETURNING` tells
        per record whether it was taken (a skipped one returns no row).
        """
        if not records:
            return []
        rows = [to_row(record) for record in records]
        with self._lock:
            conn = self._connection()
            if len(rows) == 1:
                # One autocommitted statement is atomic already; a transaction would add two round trips.
                return [conn.execute(_INSERT, rows[0]).fetchone() is not None]
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(_INSERT, rows, returning=True)
                written = [cursor.fetchone() is not None]
                while cursor.nextset():
                    written.append(cursor.fetchone() is not None)
        return written

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    def close(self) -> None:
        """Close the connection; the sink cannot be used afterwards."""
        with self._lock:
            self._conn.close()

"""PostgreSQL sink: table `llm_logs`, through psycopg 3 (the `postgres` extra).

psycopg is imported when a sink is opened, so the package imports without it.
Timestamps are TEXT, as the record holds them: a TIMESTAMPTZ would not give
back the exact string that was written. JSON columns are JSONB, read back as
text and decoded by msgspec into the record's types.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Final

from multillm.errors import ConfigError
from multillm.schemas import LLMLogRecord
from multillm.sinks._rows import TABLE, Dialect, Kind, from_row, to_row

if TYPE_CHECKING:
    import psycopg

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
)
_INSERT: Final = DIALECT.insert_sql()
CONNECT_TIMEOUT_SECONDS: Final = 10


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("a postgresql:// sink needs psycopg: pip install 'multillm[postgres]'") from None
    return psycopg


class PostgresSink:
    """Records in PostgreSQL. Thread-safe: one autocommit connection, one statement at a time.

    A connection that broke (server restart, network) is replaced on the next call;
    the call that saw it break raises `psycopg.OperationalError`.
    """

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
        row = to_row(record)
        with self._lock:
            cursor = self._connection().execute(_INSERT, row)
        return cursor.rowcount == 1

    def records(self, request_id: str | None = None, limit: int | None = None) -> list[LLMLogRecord]:
        """All records, or those of one request, by `created_at` then `model_index`, at most `limit`."""
        sql = DIALECT.select_sql(by_request=request_id is not None, limited=limit is not None)
        params = [p for p in (request_id, limit) if p is not None]
        with self._lock:
            rows = self._connection().execute(sql, params).fetchall()
        return [from_row(row) for row in rows]

    def close(self) -> None:
        """Close the connection; the sink cannot be used afterwards."""
        with self._lock:
            self._conn.close()

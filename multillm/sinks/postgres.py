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
from multillm.sinks._rows import ROWS_PER_INSERT, TABLE, Dialect, Kind, from_row, to_row
from multillm.sinks.query import RecordFilter, first_of_each, spread

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
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        """Insert `records` in one transaction; per record, False if its `log_id` was already stored
        (or came earlier in the batch).

        Each multi-row insert reports the ids it took (`RETURNING`), so a batch costs one
        round trip per `ROWS_PER_INSERT` records rather than one per record.
        """
        unique, firsts = first_of_each(records)
        taken: set[str] = set()
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                for start in range(0, len(unique), ROWS_PER_INSERT):
                    chunk = unique[start : start + ROWS_PER_INSERT]
                    params = [value for record in chunk for value in to_row(record)]
                    cursor = conn.execute(DIALECT.insert_sql(len(chunk), returning=True), params)
                    taken.update(row[0] for row in cursor.fetchall())
        return spread(firsts, [record.log_id in taken for record in unique])

    def records(
        self, request_id: str | None = None, limit: int | None = None, *, where: RecordFilter | None = None
    ) -> list[LLMLogRecord]:
        """The records `where` selects (all by default), by `created_at` then `model_index`.

        `request_id` and `limit`, when given, override those of `where`.
        """
        sql, params = DIALECT.select_sql((where or RecordFilter()).narrowed(request_id, limit))
        with self._lock:
            rows = self._connection().execute(sql, params).fetchall()
        return [from_row(row) for row in rows]

    def close(self) -> None:
        """Close the connection; the sink cannot be used afterwards."""
        with self._lock:
            self._conn.close()

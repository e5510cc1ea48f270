"""PostgreSQL sink: tables `llm_logs` and `llm_scores`, through psycopg 3 (the `postgres` extra).

psycopg is imported when a sink is opened, so the package imports without it.
Timestamps are TEXT, as the record holds them: a TIMESTAMPTZ would not give
back the exact string that was written. JSON columns are JSON, stored as the text
msgspec wrote and decoded by msgspec into the record's types. Not JSONB: JSONB
refuses the escape `\u0000`, and a prompt or a model's answer may hold U+0000;
JSON keeps any valid JSON text. A table made with JSONB columns (by earlier versions) is
migrated when a writing sink opens it. TEXT columns cannot hold U+0000 at all:
it is stored there as U+FFFD, so that no record is refused for its text.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

from multillm.errors import ConfigError
from multillm.logging_setup import get_logger
from multillm.schemas import LLMLogRecord, LLMScore, LogAttribute
from multillm.sinks._rows import LOGS, SCORES, TABLES, Dialect, Kind, SqlReader, Table
from multillm.urls import mask_url

if TYPE_CHECKING:
    import psycopg

_log = get_logger(__name__)


_NUL: Final = "\x00"
REPLACEMENT: Final = "\ufffd"


def _storable_text(text: str) -> str:
    return text.replace(_NUL, REPLACEMENT)


def _has_attribute(key: str, value: str) -> tuple[str, list[Any]]:
    # Compared as JSON text, never unescaped: PostgreSQL's JSON operators fail on a string
    # holding `\u0000`, and one such attribute would fail every filtered read. An element is
    # msgspec's text (written by this sink) or, in a row migrated from JSONB, JSONB's output,
    # which escapes strings the same way but puts a space after `:` and `,`.
    key_json, value_json = (msgspec.json.encode(text).decode() for text in (key, value))
    ours = msgspec.json.encode(LogAttribute(key=key, value=value)).decode()
    jsonb_output = f'{{"key": {key_json}, "value": {value_json}}}'
    return (
        "EXISTS (SELECT 1 FROM json_array_elements(log_attributes::json) AS a WHERE a::text IN (%s, %s))",
        [ours, jsonb_output],
    )


DIALECT: Final = Dialect(
    types={
        Kind.TEXT: "TEXT",
        Kind.INTEGER: "BIGINT",
        Kind.REAL: "DOUBLE PRECISION",
        Kind.BOOLEAN: "BOOLEAN",
        Kind.JSON: "JSON",
    },
    param="%s",
    json_param="%s::json",
    json_select="{}::text",
    byte_order=' COLLATE "C"',
    has_attribute=_has_attribute,
    storable_text=_storable_text,
)
_JSON_COLUMNS: Final = tuple(c.name for c in LOGS.columns if c.kind is Kind.JSON)
_INSERT: Final = DIALECT.insert_sql(LOGS, returning=True)
_INSERT_SCORE: Final = DIALECT.insert_sql(SCORES, returning=True)
CONNECT_TIMEOUT_SECONDS: Final = 10


def driver_error() -> type[Exception]:
    """The base class of psycopg's errors.

    Raises:
        ConfigError: psycopg is not installed.
    """
    error: type[Exception] = _psycopg().Error
    return error


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

    system = "postgresql"

    _dialect = DIALECT

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        """Connect to `url` (a libpq URL); create the tables and indexes if missing, add the columns
        a table of an earlier version lacks, and migrate JSONB columns to JSON.

        With `read_only`, every transaction of the session is read-only and nothing is created
        or migrated.

        Raises:
            ConfigError: psycopg is not installed, or `read_only` and there is no table `llm_logs`.
            psycopg.Error: the server cannot be reached, refuses the login, or has no such database.
        """
        self._psycopg = _psycopg()
        self._url = url
        # The server refuses any write in a read-only transaction: reading cannot change the sink.
        self._read_only = read_only
        self._lock = threading.Lock()
        self._conn = self._connect()
        if read_only:
            columns = set(self._column_types(LOGS))
            if not columns:
                self._conn.close()
                raise ConfigError(f"no table {LOGS.name} in {mask_url(url)}: not a multillm sink")
            self._missing = LOGS.column_names - columns
            self._no_scores = not self._column_types(SCORES)
            return
        with self._conn.transaction():
            # Serialise schema creation and migration: concurrent `CREATE TABLE IF NOT EXISTS` can
            # still collide on the catalog when several workers start at once, and the second of
            # two workers must find the columns already migrated.
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"multillm.{LOGS.name}",))
            for table in TABLES:
                for statement in DIALECT.create_statements(table):
                    self._conn.execute(statement)
            self._migrate_jsonb()
            for table in TABLES:
                added = DIALECT.add_column_statements(table, set(self._column_types(table)))
                for statement in added:
                    self._conn.execute(statement)
                if added:
                    _log.info("postgres_sink.migrated", table=table.name, added=len(added))

    def _column_types(self, table: Table) -> dict[str, str]:
        """The table's columns and their `data_type` (empty when there is no table)."""
        found = self._conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s",
            (table.name,),
        ).fetchall()
        return dict(found)

    def _migrate_jsonb(self) -> None:
        # Called in the schema transaction. The cast keeps every value (JSONB's text is JSON);
        # ALTER rewrites the table under an exclusive lock, so writers wait for it, once.
        types = self._column_types(LOGS)
        columns = [name for name, type_ in types.items() if type_ == "jsonb" and name in _JSON_COLUMNS]
        if columns:
            changes = ", ".join(f"ALTER COLUMN {name} TYPE JSON USING {name}::json" for name in columns)
            self._conn.execute(f"ALTER TABLE {LOGS.name} {changes}")
            _log.info("postgres_sink.migrated", table=LOGS.name, columns=columns, to="json")

    def _connect(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self._psycopg.connect(
            self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
        )
        if self._read_only:
            # Set here, not as the connection's `options`, which would replace the URL's own
            # (a search_path, say) and PGOPTIONS.
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
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
        (or came earlier in the batch)."""
        return self._insert(_INSERT, [DIALECT.to_row(LOGS, record) for record in records])

    def write_scores(self, scores: Sequence[LLMScore]) -> list[bool]:
        """Insert `scores` in one transaction; per score, False if its `score_id` was already stored."""
        return self._insert(_INSERT_SCORE, [DIALECT.to_row(SCORES, score) for score in scores])

    def _insert(self, sql: str, rows: list[tuple[object, ...]]) -> list[bool]:
        """`executemany` runs in pipeline mode: one prepared insert per row, sent without waiting
        for each answer, so a batch costs about one round trip. `RETURNING` tells per row whether
        it was taken (a skipped one returns no row)."""
        if not rows:
            return []
        with self._lock:
            conn = self._connection()
            if len(rows) == 1:
                # One autocommitted statement is atomic already; a transaction would add two round trips.
                return [conn.execute(sql, rows[0]).fetchone() is not None]
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(sql, rows, returning=True)
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

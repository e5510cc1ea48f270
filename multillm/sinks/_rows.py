"""The one mapping between the stored Structs and the rows of their tables, shared by the SQL sinks:
`LLMLogRecord` in `llm_logs` (`LOGS`), `LLMScore` in `llm_scores` (`SCORES`).

The columns are derived from the Struct's fields, so adding a field to the
record adds a column everywhere and the schema cannot drift from the record.
Each SQL sink only says how its dialect spells types and parameters.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from multillm import contract
from multillm.schemas import LLMLogRecord, LLMScore
from multillm.sinks.query import Condition, Op, RecordFilter

# Text columns compared and sorted as timestamps: their order must be the byte order of the text.
ORDERED_TEXT: Final = frozenset({"created_at"})


class Kind(enum.Enum):
    """How a column is stored; each dialect maps a kind to one SQL type."""

    TEXT = "text"
    INTEGER = "integer"
    REAL = "real"
    BOOLEAN = "boolean"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind
    nullable: bool
    # Typed decoder for JSON columns: reading validates nested messages/choices like the wire does.
    decoder: msgspec.json.Decoder[Any] | None


@dataclass(frozen=True, slots=True)
class Table:
    """A table and the Struct whose fields are its columns; `key` is unique, and a write of a row
    whose key is there already does nothing."""

    name: str
    struct: type[msgspec.Struct]
    key: str
    # Columns that get an index.
    indexed: tuple[str, ...]
    # Timestamps are ISO-8601 text; ties on them are broken by the other columns, for a stable order.
    order_by: tuple[str, ...]

    @property
    def columns(self) -> tuple[Column, ...]:
        return _columns_of(self.struct)

    @property
    def column_names(self) -> frozenset[str]:
        return frozenset(c.name for c in self.columns)

    def from_row(self, row: Sequence[Any]) -> Any:
        """The Struct of one row selected with the columns in order (`Dialect.select_sql`, `scores_sql`)."""
        values: dict[str, Any] = {}
        for col, value in zip(self.columns, row, strict=True):
            if value is not None:
                if col.decoder is not None:
                    value = col.decoder.decode(value)
                elif col.kind is Kind.BOOLEAN:
                    # SQLite has no boolean type and hands back 0/1.
                    value = bool(value)
            values[col.name] = value
        return self.struct(**values)


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one database spells column types, parameters and JSON casts."""

    types: dict[Kind, str]
    param: str
    json_param: str
    json_select: str
    # Appended to an ORDERED_TEXT column: PostgreSQL's default collation may not be byte order.
    byte_order: str
    # The condition and parameters of "attribute `key` has `value`".
    has_attribute: Callable[[str, str], tuple[str, list[Any]]]
    # What a TEXT column stores of a string (PostgreSQL's TEXT cannot hold U+0000).
    storable_text: Callable[[str], str] = str

    def _ordered(self, column: str) -> str:
        return column + self.byte_order if column in ORDERED_TEXT else column

    def create_statements(self, table: Table) -> list[str]:
        """`CREATE TABLE` and `CREATE INDEX` statements, all `IF NOT EXISTS`."""
        defs = []
        for col in table.columns:
            constraint = " PRIMARY KEY" if col.name == table.key else ("" if col.nullable else " NOT NULL")
            defs.append(f"{col.name} {self.types[col.kind]}{constraint}")
        statements = [f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(defs)})"]
        statements += [
            f"CREATE INDEX IF NOT EXISTS {table.name}_{c} ON {table.name} ({self._ordered(c)})" for c in table.indexed
        ]
        return statements

    def add_column_statements(self, table: Table, existing: set[str]) -> list[str]:
        """`ALTER TABLE` statements adding the columns a table made by an earlier version lacks.

        Every column added since the first version is nullable, so the rows already there stay
        valid and read back with None in it.
        """
        return [
            f"ALTER TABLE {table.name} ADD COLUMN {col.name} {self.types[col.kind]}"
            for col in table.columns
            if col.name not in existing
        ]

    def insert_sql(self, table: Table, *, returning: bool = False) -> str:
        """Insert one row, doing nothing when its key is already there; optionally return the key if taken."""
        params = ", ".join(self.json_param if c.kind is Kind.JSON else self.param for c in table.columns)
        names = ", ".join(c.name for c in table.columns)
        sql = f"INSERT INTO {table.name} ({names}) VALUES ({params}) ON CONFLICT ({table.key}) DO NOTHING"
        return sql + f" RETURNING {table.key}" if returning else sql

    def select_sql(self, query: RecordFilter, missing: frozenset[str] = frozenset()) -> tuple[str, list[Any]]:
        """The records `query` selects, in `LOGS.order_by` order, and the statement's parameters.

        `missing`: columns the table lacks (a sink of an earlier version, opened read-only, which
        must not be changed), read as NULL.
        """
        names = ", ".join(self._selected(c, missing) for c in LOGS.columns)
        selected, params = self._filtered(query)
        return f"SELECT {names} FROM {LOGS.name}{selected}", params

    def scores_sql(self, query: RecordFilter | None) -> tuple[str, list[Any]]:
        """The scores of the records `query` selects (every score, those of records not stored
        yet too, when None), in `SCORES.order_by` order, and the statement's parameters."""
        names = ", ".join(c.name for c in SCORES.columns)
        sql = f"SELECT {names} FROM {SCORES.name}"
        params: list[Any] = []
        if query is not None:
            selected, params = self._filtered(query)
            sql += f" WHERE log_id IN (SELECT log_id FROM {LOGS.name}{selected})"
        return sql + f" ORDER BY {', '.join(self._ordered(c) for c in SCORES.order_by)}", params

    def _filtered(self, query: RecordFilter) -> tuple[str, list[Any]]:
        """` WHERE ... ORDER BY ... LIMIT ...` of the records `query` selects, and its parameters."""
        sql = ""
        clauses, params = [], []
        for condition in query.conditions():
            clause, values = self._where(condition)
            clauses.append(clause)
            params += values
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY {', '.join(self._ordered(c) for c in LOGS.order_by)}"
        if query.limit is not None:
            sql += f" LIMIT {self.param}"
            params.append(query.limit)
        return sql, params

    def _selected(self, col: Column, missing: frozenset[str]) -> str:
        if col.name in missing:
            return f"NULL AS {col.name}"
        return self.json_select.format(col.name) if col.kind is Kind.JSON else col.name

    def _where(self, condition: Condition) -> tuple[str, list[Any]]:
        # The SQL spelling of `Condition.holds`; test_logs_filters checks the two agree on every sink.
        if condition.op is Op.HAS_ATTRIBUTE:
            return self.has_attribute(condition.field, condition.value)
        column = self._ordered(condition.field)
        operator = {Op.EQUAL: "=", Op.AT_LEAST: ">=", Op.BEFORE: "<"}[condition.op]
        return f"{column} {operator} {self.param}", [self.storable_text(condition.value)]

    def to_row(self, table: Table, row: msgspec.Struct) -> tuple[Any, ...]:
        """The parameters of `insert_sql` for `row`: JSON columns as JSON text, which keeps every
        character (U+0000 too, as the escape `\\u0000`); TEXT columns as `storable_text` makes them."""
        values: list[Any] = []
        for col in table.columns:
            value = getattr(row, col.name)
            if value is not None:
                if col.kind is Kind.JSON:
                    value = _json_encoder.encode(value).decode()
                elif col.kind is Kind.TEXT:
                    value = self.storable_text(value)
            values.append(value)
        return tuple(values)


def _column(name: str, annotation: Any) -> Column:
    info = mi.type_info(annotation)
    nullable = False
    if isinstance(info, mi.UnionType):
        rest = [t for t in info.types if not isinstance(t, mi.NoneType)]
        nullable = len(rest) < len(info.types)
        if len(rest) == 1:
            info = rest[0]
    match info:
        case mi.BoolType():
            kind = Kind.BOOLEAN
        case mi.IntType():
            kind = Kind.INTEGER
        case mi.FloatType():
            kind = Kind.REAL
        case mi.StrType() | mi.LiteralType():
            kind = Kind.TEXT
        case _:
            kind = Kind.JSON
    decoder = msgspec.json.Decoder(annotation) if kind is Kind.JSON else None
    return Column(name, kind, nullable, decoder)


@functools.cache
def _columns_of(struct: type[msgspec.Struct]) -> tuple[Column, ...]:
    return tuple(_column(f.name, f.type) for f in msgspec.structs.fields(struct))


LOGS: Final = Table(
    contract.LOG_TABLE,
    LLMLogRecord,
    key="log_id",
    # The records of one request, the siblings of one trace, and what `multillm logs` filters on
    # most (one model, a time window).
    indexed=("request_id", "trace_id", "model_name", "created_at"),
    order_by=("created_at", "model_index", "log_id"),
)
SCORES: Final = Table(
    contract.SCORE_TABLE,
    LLMScore,
    key="score_id",
    indexed=("log_id", "request_id"),
    order_by=("created_at", "score_id"),
)
TABLES: Final = (LOGS, SCORES)

_json_encoder: Final = msgspec.json.Encoder()


class SqlReader:
    """`Sink.records` and `Sink.scores` for the SQL sinks, which differ only in dialect and in how
    they reach their connection."""

    _dialect: Dialect
    # Columns of `LOGS` the table lacks: set by a read-only sink, which cannot add them.
    _missing: frozenset[str] = frozenset()
    # Set by a read-only sink of a version before scores, which has no `llm_scores` table.
    _no_scores: bool = False

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """The rows of `sql`, run under the sink's lock."""
        raise NotImplementedError

    def records(
        self, request_id: str | None = None, limit: int | None = None, *, where: RecordFilter | None = None
    ) -> list[LLMLogRecord]:
        """The records `where` selects (all by default), by `created_at` then `model_index`.

        `request_id` and `limit`, when given, override those of `where`.
        """
        sql, params = self._dialect.select_sql((where or RecordFilter()).narrowed(request_id, limit), self._missing)
        return [LOGS.from_row(row) for row in self._fetch(sql, params)]

    def scores(self, where: RecordFilter | None = None) -> list[LLMScore]:
        """The scores of the records `where` selects (every score when None), by `created_at`."""
        if self._no_scores:
            return []
        sql, params = self._dialect.scores_sql(where)
        return [SCORES.from_row(row) for row in self._fetch(sql, params)]

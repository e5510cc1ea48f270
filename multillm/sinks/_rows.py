"""The one mapping between `LLMLogRecord` and a row of table `llm_logs`, shared by the SQL sinks.

The columns are derived from the Struct's fields, so adding a field to the
record adds a column everywhere and the schema cannot drift from the record.
Each SQL sink only says how its dialect spells types and parameters.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from multillm import contract
from multillm.schemas import LLMLogRecord
from multillm.sinks.query import Condition, Op, RecordFilter

TABLE: Final = contract.LOG_TABLE
# Columns that get an index: the records of one request, the siblings of one trace, and what
# `multillm logs` filters on most (one model, a time window).
INDEXED: Final = ("request_id", "trace_id", "model_name", "created_at")
# Text columns compared and sorted as timestamps: their order must be the byte order of the text.
ORDERED_TEXT: Final = frozenset({"created_at"})
# Timestamps are ISO-8601 text; ties on them are broken by model order, then id, for a stable order.
ORDER_BY: Final = ("created_at", "model_index", "log_id")


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

    def create_statements(self) -> list[str]:
        """`CREATE TABLE` and `CREATE INDEX` statements, all `IF NOT EXISTS`."""
        defs = []
        for col in COLUMNS:
            constraint = " PRIMARY KEY" if col.name == "log_id" else ("" if col.nullable else " NOT NULL")
            defs.append(f"{col.name} {self.types[col.kind]}{constraint}")
        statements = [f"CREATE TABLE IF NOT EXISTS {TABLE} ({', '.join(defs)})"]
        statements += [f"CREATE INDEX IF NOT EXISTS {TABLE}_{c} ON {TABLE} ({self._ordered(c)})" for c in INDEXED]
        return statements

    def add_column_statements(self, existing: set[str]) -> list[str]:
        """`ALTER TABLE` statements adding the columns a table made by an earlier version lacks.

        Every column added since the first version is nullable, so the rows already there stay
        valid and read back with None in it.
        """
        return [
            f"ALTER TABLE {TABLE} ADD COLUMN {col.name} {self.types[col.kind]}"
            for col in COLUMNS
            if col.name not in existing
        ]

    def insert_sql(self, *, returning: bool = False) -> str:
        """Insert one row, doing nothing when its `log_id` is already there; optionally return the id if taken."""
        params = ", ".join(self.json_param if c.kind is Kind.JSON else self.param for c in COLUMNS)
        names = ", ".join(c.name for c in COLUMNS)
        sql = f"INSERT INTO {TABLE} ({names}) VALUES ({params}) ON CONFLICT (log_id) DO NOTHING"
        return sql + " RETURNING log_id" if returning else sql

    def select_sql(self, query: RecordFilter, missing: frozenset[str] = frozenset()) -> tuple[str, list[Any]]:
        """The rows `query` selects, in `ORDER_BY` order, and the statement's parameters.

        `missing`: columns the table lacks (a sink of an earlier version, opened read-only, which
        must not be changed), read as NULL.
        """
        names = ", ".join(self._selected(c, missing) for c in COLUMNS)
        sql = f"SELECT {names} FROM {TABLE}"
        clauses, params = [], []
        for condition in query.conditions():
            clause, values = self._where(condition)
            clauses.append(clause)
            params += values
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY {', '.join(self._ordered(c) for c in ORDER_BY)}"
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

    def to_row(self, record: LLMLogRecord) -> tuple[Any, ...]:
        """The parameters of `insert_sql` for `record`: JSON columns as JSON text, which keeps every
        character (U+0000 too, as the escape `\\u0000`); TEXT columns as `storable_text` makes them."""
        row: list[Any] = []
        for col in COLUMNS:
            value = getattr(record, col.name)
            if value is not None:
                if col.kind is Kind.JSON:
                    value = _json_encoder.encode(value).decode()
                elif col.kind is Kind.TEXT:
                    value = self.storable_text(value)
            row.append(value)
        return tuple(row)


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


COLUMNS: Final = tuple(_column(f.name, f.type) for f in msgspec.structs.fields(LLMLogRecord))
COLUMN_NAMES: Final = frozenset(c.name for c in COLUMNS)

_json_encoder: Final = msgspec.json.Encoder()


def from_row(row: Sequence[Any]) -> LLMLogRecord:
    """The record of one row selected with `Dialect.select_sql`."""
    values: dict[str, Any] = {}
    for col, value in zip(COLUMNS, row, strict=True):
        if value is not None:
            if col.decoder is not None:
                value = col.decoder.decode(value)
            elif col.kind is Kind.BOOLEAN:
                # SQLite has no boolean type and hands back 0/1.
                value = bool(value)
        values[col.name] = value
    return LLMLogRecord(**values)


class SqlReader:
    """`Sink.records` for the SQL sinks, which differ only in dialect and in how they reach their connection."""

    _dialect: Dialect
    # Columns of `COLUMNS` the table lacks: set by a read-only sink, which cannot add them.
    _missing: frozenset[str] = frozenset()

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
        return [from_row(row) for row in self._fetch(sql, params)]

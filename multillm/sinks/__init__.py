"""Where log records and their scores go: a JSON Lines file, SQLite or PostgreSQL, chosen by URL.

Every sink is idempotent on `log_id` and `score_id`, so a redelivered message never
makes a second record or score, and is safe to share between threads.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from multillm.errors import ConfigError
from multillm.schemas import LLMLogRecord, LLMScore
from multillm.sinks import postgres
from multillm.sinks._url import cannot_open, file_path, postgres_url, split_scheme
from multillm.sinks.jsonl import JsonlSink
from multillm.sinks.postgres import PostgresSink
from multillm.sinks.query import RecordFilter, parse_bound
from multillm.sinks.sqlite import SqliteSink
from multillm.urls import mask_url

__all__ = [
    "JsonlSink",
    "PostgresSink",
    "RecordFilter",
    "Sink",
    "SqliteSink",
    "describe_sink",
    "mask_url",
    "open_sink",
    "parse_bound",
]

_POSTGRES_SCHEMES = frozenset({"postgresql", "postgres", "postgresql+psycopg"})


@runtime_checkable
class Sink(Protocol):
    """Where `LLMLogRecord`s and `LLMScore`s are stored. Implementations are thread-safe."""

    # What stores the rows, as OpenTelemetry's `db.system.name` says it (`jsonl` for the files).
    system: str

    def write(self, record: LLMLogRecord) -> bool:
        """Store `record`. True if written, False if a record with its `log_id` already existed."""
        ...

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        """Store `records` in one transaction (one commit, one append). Per record, in order: True if
        written, False if its `log_id` already existed or came earlier in the batch (the first copy wins).

        On an exception none of the batch is stored (the JSON Lines sink: none is counted as
        stored; a failed append may leave a torn line, which readers skip).
        """
        ...

    def records(
        self, request_id: str | None = None, limit: int | None = None, *, where: RecordFilter | None = None
    ) -> list[LLMLogRecord]:
        """The records `where` selects (all if None), ordered by `created_at`, `model_index`, `log_id`.

        Args:
            request_id: only the records of this request (overrides `where.request_id`).
            limit: at most this many records, the first in that order (overrides `where.limit`).
            where: the filter; see `RecordFilter` for what each field means.
        """
        ...

    def write_scores(self, scores: Sequence[LLMScore]) -> list[bool]:
        """Store `scores` in one transaction; per score, in order: True if written, False if its
        `score_id` already existed or came earlier in the batch (the first copy wins).

        A score of a record that is not stored (yet) is stored all the same.
        """
        ...

    def scores(self, where: RecordFilter | None = None) -> list[LLMScore]:
        """The scores of the records `where` selects, or every score (of records not stored yet
        too) when None; ordered by `created_at`, `score_id`."""
        ...

    def close(self) -> None:
        """Release the file or connection."""
        ...


def open_sink(url: str, *, read_only: bool = False) -> Sink:
    """Open the sink named by `url`: for writing, creating it as needed, or with `read_only` for
    reading only, creating and changing nothing (a sink that does not exist is then an error).

    `jsonl:///relative/path` and `sqlite:///relative.db` are relative to the working
    folder, `jsonl:////absolute/path` and `sqlite:////absolute.db` are absolute (as
    SQLAlchemy reads them); `sqlite://` is an in-memory database. `postgresql://...`
    and `postgres://...` are libpq URLs, and so is `postgresql+psycopg://...` (SQLAlchemy's
    spelling) once its `+psycopg` is dropped.

    Raises:
        ConfigError: the URL is malformed or its scheme unknown, psycopg is missing for a
            PostgreSQL URL, or the sink cannot be opened (a folder that cannot be written,
            a server that does not answer, a missing database; with `read_only`, a missing
            file or table). The message is one line, names the sink and masks any password.
    """
    scheme, rest = split_scheme(url)
    try:
        if scheme == "jsonl":
            return JsonlSink(file_path(url, rest, memory_ok=False), read_only=read_only)
        if scheme == "sqlite":
            return SqliteSink(file_path(url, rest, memory_ok=True), read_only=read_only)
        if scheme in _POSTGRES_SCHEMES:
            driver_error = postgres.driver_error()
            try:
                return PostgresSink(postgres_url(url, rest), read_only=read_only)
            except driver_error as exc:
                raise ConfigError(cannot_open(url, exc)) from None
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(cannot_open(url, exc)) from None
    raise ConfigError(
        f"unknown sink URL scheme {scheme!r} in {mask_url(url)!r}: "
        "use jsonl:///PATH, sqlite:///PATH or postgresql://..."
    )


def describe_sink(url: str) -> str:
    """The sink of `url` for a person: the URL with its password masked, and a file sink's absolute path."""
    masked = mask_url(url)
    try:
        scheme, rest = split_scheme(url)
        if scheme in ("jsonl", "sqlite"):
            return f"sink {masked} (file {file_path(url, rest, memory_ok=True)})"
    except ConfigError:
        pass
    return f"sink {masked}"

"""JSON Lines sink: one `LLMLogRecord` (msgspec JSON, snake_case) a line, appended to one file,
and its scores (`LLMScore`) in a sibling file (`scores_path`).

Several processes, each with several threads, may append to the same file.
Idempotency on the key (`log_id`, `score_id`) holds across all of them: a writer
takes an exclusive `flock` on the file, reads whatever other writers appended since
it last looked, and appends only if the key is new. The lock is per open file, so
threads of one process are serialised by a `threading.Lock` as well.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Final, Generic, TypeVar

import msgspec

from multillm.errors import ConfigError
from multillm.logging_setup import get_logger
from multillm.schemas import LLMLogRecord, LLMScore, encode
from multillm.sinks.query import RecordFilter

_CHUNK: Final = 1 << 20
_log = get_logger(__name__)

Row = TypeVar("Row", LLMLogRecord, LLMScore)


def scores_path(path: Path) -> Path:
    """The scores' file beside the records' `path`: `logs.jsonl` has `logs.scores.jsonl`."""
    return path.with_name(f"{path.stem}.scores{path.suffix or '.jsonl'}")


class _KeyedFile(Generic[Row]):
    """Rows of one type appended to one file, at most one per key; thread- and process-safe.

    The keys seen so far are kept in memory, so each append reads only the bytes other
    writers appended since the previous one. `create`: made on the first append, not before.
    """

    def __init__(self, path: Path, row_type: type[Row], key: str, *, read_only: bool) -> None:
        self.path = path
        self._key: Callable[[Row], str] = lambda row: getattr(row, key)
        # Catching up only needs the keys; msgspec skips the rest of each line without building it.
        key_type = msgspec.defstruct(f"_{key}", [(key, str)])
        self._key_decoder = msgspec.json.Decoder(key_type)
        self._key_name = key
        self._decoder: msgspec.json.Decoder[Row] = msgspec.json.Decoder(row_type)
        self._read_only = read_only
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._offset = 0  # bytes of the file already read into _seen
        self._fd = -1
        self._pid = -1

    def _open(self) -> int:
        self._pid = os.getpid()
        if self._read_only:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        # O_APPEND: every write lands at the end even if another process wrote since our last look.
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def open(self) -> None:
        with self._lock:
            self._fd = self._open()

    @contextmanager
    def _locked(self, operation: int) -> Iterator[int]:
        with self._lock:
            if self._fd < 0 or self._pid != os.getpid():
                # Not opened yet, or a forked child, which shares the parent's open file and with it
                # the flock, which would then exclude nothing: give the child its own.
                self._fd = self._open()
            fcntl.flock(self._fd, operation)
            try:
                yield self._fd
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _catch_up(self, fd: int) -> bool:
        """Read the keys appended since the last look. True if the file ends mid-line."""
        size = os.fstat(fd).st_size
        if size < self._offset:
            # Truncated or replaced under us: what we remember no longer describes the file.
            self._seen.clear()
            self._offset = 0
        pos, tail = self._offset, b""
        while pos < size:
            chunk = os.pread(fd, min(_CHUNK, size - pos), pos)
            if not chunk:
                break
            pos += len(chunk)
            *lines, tail = (tail + chunk).split(b"\n")
            for line in lines:
                # A blank or torn line holds no row.
                with suppress(msgspec.DecodeError, msgspec.ValidationError):
                    self._seen.add(getattr(self._key_decoder.decode(line), self._key_name))
        self._offset = pos - len(tail)
        return bool(tail)

    def append_new(self, rows: Sequence[Row]) -> list[bool]:
        """Append the rows whose key is new (to the file and earlier in the batch) with one write.

        Per row, True if it was appended.

        Raises:
            PermissionError: the sink was opened read-only.
        """
        if self._read_only:
            raise PermissionError(f"the JSON Lines sink at {self.path} was opened read-only")
        with self._locked(fcntl.LOCK_EX) as fd:
            torn = self._catch_up(fd)
            lines, written = [], []
            for row in rows:
                new = self._key(row) not in self._seen
                if new:
                    lines.append(encode(row) + b"\n")
                    self._seen.add(self._key(row))
                written.append(new)
            if lines:
                # A writer died mid-line; end its line so ours stay whole and parseable.
                data = (b"\n" if torn else b"") + b"".join(lines)
                try:
                    _write_all(fd, data)
                except BaseException:
                    # None of the batch may count as stored; the next catch-up re-reads whatever did land.
                    self._seen.difference_update(self._key(r) for r, new in zip(rows, written, strict=True) if new)
                    raise
                self._offset = os.fstat(fd).st_size
        return written

    def read(self) -> list[Row]:
        """Every row, the first of each key (as a database would have kept), in the file's order."""
        if self._read_only and self._fd < 0 and not self.path.is_file():
            return []  # a scores file nobody has written yet
        with self._locked(fcntl.LOCK_SH) as fd:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        found: dict[str, Row] = {}
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                row = self._decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                _log.warning("jsonl_sink.skipped_line", path=str(self.path), line=number, error=str(exc))
                continue
            # A duplicate can only come from a writer that did not take the lock.
            found.setdefault(self._key(row), row)
        return list(found.values())

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class JsonlSink:
    """Records appended to a JSON Lines file, scores to its sibling. Thread-safe and multi-process safe."""

    system = "jsonl"

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        """Open (creating the file and its parent folders as needed) the file at `path`; the scores'
        file is made on the first score.

        With `read_only`, the file is opened for reading only and nothing is created.

        Raises:
            ConfigError: `read_only` and there is no such file.
            OSError: the file or its folder cannot be created or opened.
        """
        self.path = Path(path)
        if read_only and not self.path.is_file():
            raise ConfigError(f"no JSON Lines sink at {self.path}: the file does not exist")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records = _KeyedFile(self.path, LLMLogRecord, "log_id", read_only=read_only)
        self._records.open()
        self._scores = _KeyedFile(scores_path(self.path), LLMScore, "score_id", read_only=read_only)

    def write(self, record: LLMLogRecord) -> bool:
        """Append `record`; False if a record with its `log_id` is already in the file."""
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        """Append the records whose `log_id` is new (to the file and earlier in the batch) with one write.

        Per record, True if it was appended.

        Raises:
            PermissionError: the sink was opened read-only.
        """
        return self._records.append_new(records)

    def write_scores(self, scores: Sequence[LLMScore]) -> list[bool]:
        """Append the scores whose `score_id` is new; per score, True if it was appended."""
        return self._scores.append_new(scores)

    def records(
        self, request_id: str | None = None, limit: int | None = None, *, where: RecordFilter | None = None
    ) -> list[LLMLogRecord]:
        """The records `where` selects (all by default), by `created_at` then `model_index`.

        `request_id` and `limit`, when given, override those of `where`.
        """
        query = (where or RecordFilter()).narrowed(request_id, limit)
        selected = [record for record in self._records.read() if query.matches(record)]
        selected.sort(key=lambda r: (r.created_at, r.model_index, r.log_id))
        return selected if query.limit is None else selected[: query.limit]

    def scores(self, where: RecordFilter | None = None) -> list[LLMScore]:
        """The scores of the records `where` selects (every score when None), by `created_at`."""
        found = self._scores.read()
        if where is not None:
            log_ids = {record.log_id for record in self.records(where=where)}
            found = [score for score in found if score.log_id in log_ids]
        return sorted(found, key=lambda s: (s.created_at, s.score_id))

    def close(self) -> None:
        """Close the files; the sink cannot be used afterwards."""
        self._records.close()
        self._scores.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]

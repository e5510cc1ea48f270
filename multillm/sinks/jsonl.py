"""JSON Lines sink: one `LLMLogRecord` (msgspec JSON, snake_case) a line, appended to one file.

Several processes, each with several threads, may append to the same file.
Idempotency on `log_id` holds across all of them: a writer takes an exclusive
`flock` on the file, reads whatever other writers appended since it last
looked, and appends only if the id is new. The lock is per open file, so
threads of one process are serialised by a `threading.Lock` as well.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Final

import msgspec

from multillm.errors import ConfigError
from multillm.logging_setup import get_logger
from multillm.schemas import LLMLogRecord, decode_record, encode
from multillm.sinks.query import RecordFilter

_CHUNK: Final = 1 << 20
_log = get_logger(__name__)


class _LogId(msgspec.Struct):
    log_id: str


# Catching up only needs the ids; msgspec skips the rest of each line without building it.
_id_decoder: Final = msgspec.json.Decoder(_LogId)


class JsonlSink:
    """Records appended to a JSON Lines file. Thread-safe and multi-process safe.

    The ids seen so far are kept in memory (one set per sink), so each write
    reads only the bytes other writers appended since the previous one.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        """Open (creating the file and its parent folders as needed) the file at `path`.

        With `read_only`, the file is opened for reading only and nothing is created.

        Raises:
            ConfigError: `read_only` and there is no such file.
            OSError: the file or its folder cannot be created or opened.
        """
        self.path = Path(path)
        self._read_only = read_only
        if read_only and not self.path.is_file():
            raise ConfigError(f"no JSON Lines sink at {self.path}: the file does not exist")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._offset = 0  # bytes of the file already read into _seen
        self._fd = self._open()

    def _open(self) -> int:
        self._pid = os.getpid()
        if self._read_only:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        # O_APPEND: every write lands at the end even if another process wrote since our last look.
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @contextmanager
    def _locked(self, operation: int) -> Iterator[int]:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child shares the parent's open file, and with it the flock,
                # which would then exclude nothing: give the child its own.
                self._fd = self._open()
            fcntl.flock(self._fd, operation)
            try:
                yield self._fd
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _catch_up(self, fd: int) -> bool:
        """Read the ids appended since the last look. True if the file ends mid-line."""
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
                # A blank or torn line holds no record.
                with suppress(msgspec.DecodeError, msgspec.ValidationError):
                    self._seen.add(_id_decoder.decode(line).log_id)
        self._offset = pos - len(tail)
        return bool(tail)

    def write(self, record: LLMLogRecord) -> bool:
        """Append `record`; False if a record with its `log_id` is already in the file."""
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        """Append the records whose `log_id` is new (to the file and earlier in the batch) with one write.

        Per record, True if it was appended.

        Raises:
            PermissionError: the sink was opened read-only.
        """
        if self._read_only:
            raise PermissionError(f"the JSON Lines sink at {self.path} was opened read-only")
        with self._locked(fcntl.LOCK_EX) as fd:
            torn = self._catch_up(fd)
            lines, written = [], []
            for record in records:
                new = record.log_id not in self._seen
                if new:
                    lines.append(encode(record) + b"\n")
                    self._seen.add(record.log_id)
                written.append(new)
            if lines:
                # A writer died mid-line; end its line so ours stay whole and parseable.
                data = (b"\n" if torn else b"") + b"".join(lines)
                try:
                    _write_all(fd, data)
                except BaseException:
                    # None of the batch may count as stored; the next catch-up re-reads whatever did land.
                    self._seen.difference_update(r.log_id for r, new in zip(records, written, strict=True) if new)
                    raise
                self._offset = os.fstat(fd).st_size
        return written

    def records(
        self, request_id: str | None = None, limit: int | None = None, *, where: RecordFilter | None = None
    ) -> list[LLMLogRecord]:
        """The records `where` selects (all by default), by `created_at` then `model_index`.

        `request_id` and `limit`, when given, override those of `where`.
        """
        query = (where or RecordFilter()).narrowed(request_id, limit)
        with self._locked(fcntl.LOCK_SH) as fd:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        found: dict[str, LLMLogRecord] = {}
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = decode_record(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                _log.warning("jsonl_sink.skipped_line", path=str(self.path), line=number, error=str(exc))
                continue
            # The first copy wins, as it would have in a database; a duplicate can
            # only come from a writer that did not take the lock.
            # The first copy wins, as it would have in a database; a duplicate can
            # only come from a writer that did not take the lock.
            found.setdefault(record.log_id, record)
        selected = [record for record in found.values() if query.matches(record)]
        selected.sort(key=lambda r: (r.created_at, r.model_index, r.log_id))
        return selected if query.limit is None else selected[: query.limit]

    def close(self) -> None:
        """Close the file; the sink cannot be used afterwards."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]

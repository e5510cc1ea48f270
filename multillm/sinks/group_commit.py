"""Group commit: the records that threads write at the same time go to the sink as one batch.

A worker's sink threads (`asyncio.to_thread` from its calls) each write one record per message and must know it is
stored before the message is acked. One transaction per record made them queue
on the sink's lock (profiled: 8 threads spent most of their sink time waiting
for it). Here the first thread to arrive while nobody writes becomes the writer:
it stores everything waiting with one `write_many`, its own record included,
while later arrivals wait for it (or for the next writer among them). Each
caller still returns only once its own record's batch is stored, with its own
result. A batch that fails is written again record by record, so that a record
the database refuses fails its own caller only. A lone record is written at once by its own
thread: no hand-off to another thread, and nothing waits for a timer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Final

import structlog

from multillm.schemas import LLMLogRecord
from multillm.sinks import RecordFilter, Sink

log = structlog.get_logger(__name__)

MAX_BATCH: Final = 500


class GroupCommitSink:
    """A `Sink` that batches concurrent writes to `inner`. Thread-safe.

    Args:
        inner: the sink that stores the batches.
        observe: told, for every record, how long its batch's write took and whether it raised.
    """

    def __init__(self, inner: Sink, observe: Callable[[float, bool], None] = lambda seconds, failed: None) -> None:
        self._inner = inner
        self._observe = observe
        self._changed = threading.Condition()
        self._waiting: list[tuple[LLMLogRecord, Future[bool]]] = []
        self._writing = False
        self._closed = False

    @property
    def queued(self) -> int:
        """Records waiting for a writer (not counting the batch being written)."""
        with self._changed:
            return len(self._waiting)

    def write(self, record: LLMLogRecord) -> bool:
        """Store `record` with whatever else is waiting; False if its `log_id` was already stored.

        Raises:
            Exception: what the inner sink raised for the batch.
        """
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        futures: list[Future[bool]] = [Future() for _ in records]
        with self._changed:
            if self._closed:
                raise RuntimeError("the sink is closed")
            self._waiting.extend(zip(records, futures, strict=True))
        while not all(f.done() for f in futures):
            with self._changed:
                while self._writing and not all(f.done() for f in futures):
                    self._changed.wait()
                if all(f.done() for f in futures):
                    break
                self._writing = True
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                self._write(batch)
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()
        return [f.result() for f in futures]

    def records(
        self, request_id: str | None = None, limit: int | None = None, *, where: RecordFilter | None = None
    ) -> list[LLMLogRecord]:
        return self._inner.records(request_id, limit, where=where)

    def close(self) -> None:
        """Wait for the batch being written, then close the inner sink."""
        with self._changed:
            self._closed = True
            while self._writing:
                self._changed.wait()
        self._inner.close()

    def _write(self, batch: list[tuple[LLMLogRecord, Future[bool]]]) -> None:
        """Store a batch; if it fails as a whole, each record alone, so that one bad record
        (one the database refuses) fails only its own caller. Every future is settled."""
        try:
            try:
                self._settle(batch, self._timed(batch))
            except Exception as exc:
                if len(batch) == 1:
                    batch[0][1].set_exception(exc)
                    return
                for one in batch:
                    if one[1].done():
                        continue
                    try:
                        self._settle([one], self._timed([one]))
                    except Exception as single:
                        one[1].set_exception(single)
        finally:
            for _, future in batch:
                if not future.done():  # only a bug gets here; never leave a caller waiting
                    future.set_exception(RuntimeError("the record was not stored"))

    def _timed(self, batch: list[tuple[LLMLogRecord, Future[bool]]]) -> list[bool]:
        started = time.perf_counter()
        try:
            results = self._inner.write_many([record for record, _ in batch])
        except Exception:
            self._observed(started, len(batch), failed=True)
            raise
        self._observed(started, len(batch), failed=False)
        return results

    @staticmethod
    def _settle(batch: list[tuple[LLMLogRecord, Future[bool]]], results: list[bool]) -> None:
        for (_, future), written in zip(batch, results, strict=True):
            future.set_result(written)

    def _observed(self, started: float, count: int, *, failed: bool) -> None:
        seconds = time.perf_counter() - started
        try:
            for _ in range(count):
                self._observe(seconds, failed)
        except Exception:  # counting must never fail a write
            log.exception("sink.observe_failed")

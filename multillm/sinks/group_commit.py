"""Group commit: the records that pool threads write at the same time go to the sink as one batch.

A worker's pool threads each write one record per message and must know it is
stored before the message is acked. One transaction per record made them queue
on the sink's lock (profiled: 8 threads spent most of their sink time waiting
for it). Here a writer thread takes everything waiting and stores it with one
`write_many`; each caller still blocks until its own record's batch is stored,
and gets its own result or the batch's exception. A lone record is written at
once: batches form only when writes overlap, so nothing waits for a timer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Final

from multillm.schemas import LLMLogRecord
from multillm.sinks import RecordFilter, Sink

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
        self._lock = threading.Condition()
        self._waiting: list[tuple[LLMLogRecord, Future[bool]]] = []
        self._closed = False
        self._writer = threading.Thread(target=self._write_batches, name="sink-writer", daemon=True)
        self._writer.start()

    @property
    def queued(self) -> int:
        """Records waiting for the writer (not counting the batch it is writing)."""
        with self._lock:
            return len(self._waiting)

    def write(self, record: LLMLogRecord) -> bool:
        """Store `record` with whatever else is waiting; False if its `log_id` was already stored.

        Raises:
            Exception: what the inner sink raised for the batch.
        """
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        futures: list[Future[bool]] = [Future() for _ in records]
        with self._lock:
            if self._closed:
                raise RuntimeError("the sink is closed")
            self._waiting.extend(zip(records, futures, strict=True))
            self._lock.notify()
        return [f.result() for f in futures]

    def records(
        self, request_id: str | None = None, limit: int | None = None, *, where: RecordFilter | None = None
    ) -> list[LLMLogRecord]:
        return self._inner.records(request_id, limit, where=where)

    def close(self) -> None:
        """Store what is waiting, stop the writer, close the inner sink."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._writer.join()
        self._inner.close()

    def _write_batches(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            started = time.perf_counter()
            try:
                results = self._inner.write_many([record for record, _ in batch])
            except Exception as exc:
                self._observed(started, len(batch), failed=True)
                for _, future in batch:
                    future.set_exception(exc)
                continue
            self._observed(started, len(batch), failed=False)
            for (_, future), written in zip(batch, results, strict=True):
                future.set_result(written)

    def _observed(self, started: float, count: int, *, failed: bool) -> None:
        seconds = time.perf_counter() - started
        for _ in range(count):
            self._observe(seconds, failed)

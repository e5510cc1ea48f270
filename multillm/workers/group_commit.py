"""Group commit for a worker's event loop: rows that arrive while a batch is stored go together in the next.

Each of a worker's calls writes one record (or score) and must know it is stored before its
message is acked. One transaction per record would queue them all on the sink
(profiled with a thread per call: 8 threads spent most of their sink time waiting
for its lock). Here the loop gathers them: a record that arrives while nothing is
being written starts a batch at once (nothing waits for a timer); records that
arrive meanwhile wait, and go together in the next batch. The blocking
`write_many` runs on the sink's own threads, one batch at a time, so that the sink's
threads do not take turns at the GIL with the loop. Each caller gets its own
record's answer. A batch that fails is written again record by record, so that a
record the database refuses fails its own caller only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import Final, Generic, TypeVar

from multillm.logging_setup import get_logger

log = get_logger(__name__)

MAX_BATCH: Final = 500

Row = TypeVar("Row")
# A row waiting for its batch, and where its outcome goes.
_Waiting = tuple[Row, "asyncio.Future[bool]"]


class GroupCommit(Generic[Row]):
    """Batches the writes of one event loop's tasks; use it from that loop only.

    Args:
        write_many: stores a batch in one transaction, and says per row whether it was new
            (`Sink.write_many`, `Sink.write_scores`; thread-safe).
        threads: where the sink's blocking writes run (not the loop's default executor, which
            pika and aiohttp need for name lookups; None: that one, for tests).
        observe: told, for every row, how long its batch's write took and whether it raised.
    """

    def __init__(
        self,
        write_many: Callable[[Sequence[Row]], list[bool]],
        threads: Executor | None = None,
        observe: Callable[[float, bool], None] = lambda seconds, failed: None,
    ) -> None:
        self._write_many = write_many
        self._threads = threads
        self._observe = observe
        self._waiting: list[_Waiting[Row]] = []
        self._writing = False

    @property
    def queued(self) -> int:
        """Rows waiting for the batch being written to finish."""
        return len(self._waiting)

    async def write(self, row: Row) -> bool:
        """Store `row` with whatever else is waiting; False if its key was already stored.

        Raises:
            Exception: what the sink raised for this row.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        if not self._writing:
            self._start_batch()
        return await future

    def _start_batch(self) -> None:
        batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
        loop = asyncio.get_running_loop()
        try:
            stored = loop.run_in_executor(self._threads, self._store, [row for row, _ in batch])
        except Exception as exc:  # the executor is shut down: the worker is ending
            self._answer(batch, [exc] * len(batch))
            return
        self._writing = True
        stored.add_done_callback(partial(self._stored, batch))

    def _stored(self, batch: list[_Waiting[Row]], stored: asyncio.Future[list[bool | Exception]]) -> None:
        self._writing = False
        try:
            outcomes = stored.result()
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the sink answered {len(outcomes)} results for {len(batch)} rows")
        except Exception as exc:  # only a bug gets here; never leave a caller waiting
            outcomes = [exc] * len(batch)
        self._answer(batch, outcomes)
        if self._waiting:
            self._start_batch()

    @staticmethod
    def _answer(batch: list[_Waiting[Row]], outcomes: list[bool | Exception]) -> None:
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled (the worker is stopping)
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    # --- on a sink thread ---------------------------------------------------

    def _store(self, rows: list[Row]) -> list[bool | Exception]:
        """Each row's outcome: stored (True), already there (False), or what the sink raised for it."""
        try:
            return list(self._timed(rows))
        except Exception as exc:
            if len(rows) == 1:
                return [exc]
        outcomes: list[bool | Exception] = []
        for row in rows:
            try:
                outcomes += self._timed([row])
            except Exception as single:
                outcomes.append(single)
        return outcomes

    def _timed(self, rows: Sequence[Row]) -> list[bool]:
        started = time.perf_counter()
        try:
            results = self._write_many(rows)
        except Exception:
            self._observed(started, len(rows), failed=True)
            raise
        self._observed(started, len(rows), failed=False)
        return results

    def _observed(self, started: float, count: int, *, failed: bool) -> None:
        seconds = time.perf_counter() - started
        try:
            for _ in range(count):
                self._observe(seconds, failed)
        except Exception:  # counting must never fail a write
            log.exception("sink.observe_failed")

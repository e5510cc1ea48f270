"""A worker's sink: records and scores written in group commits on the sink's own threads, each
write tried again after `SINK_RETRY_WAITS`, and the sink closed last.

The sink's calls block, so they run on `threads` (not the loop's default executor: pika
and aiohttp resolve names there, and a hung database must not stop a reconnect).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from concurrent.futures import Executor
from functools import partial
from typing import Final

import structlog
from structlog.typing import FilteringBoundLogger

from multillm import tracing
from multillm.config import SINK_RETRY_WAITS
from multillm.contract import LOG_TABLE, SCORE_TABLE
from multillm.errors import describe
from multillm.metrics import WorkerMetrics
from multillm.records import log_id_for
from multillm.schemas import LLMLogRecord, LLMScore
from multillm.sinks import RecordFilter, Sink
from multillm.workers.group_commit import GroupCommit, Row

log = structlog.get_logger(__name__)

# Logged (at info) each time the sink refused a record already stored under its log id:
# `multillm chaos` counts these lines.
RECORD_DUPLICATE: Final = "record.duplicate"


class Storage:
    """Owns `sink` and `threads` from construction on, and closes both (`close`); on the loop only."""

    def __init__(self, sink: Sink, threads: Executor | None = None, metrics: WorkerMetrics | None = None) -> None:
        self._sink = sink
        self._threads = threads
        observe = (metrics or WorkerMetrics()).sink_written
        self._records = GroupCommit(sink.write_many, threads, observe)
        self._scores = GroupCommit(sink.write_scores, threads, observe)

    async def store_record(self, record: LLMLogRecord, bound: FilteringBoundLogger) -> bool | None:
        """Write `record`: True, False if a record with its `log_id` was there already, None if
        the sink would not take it (after retrying; `bound` logged each failure)."""
        return await self._traced(LOG_TABLE, _store(self._records, record, bound, "record.write_failed"))

    async def store_score(self, score: LLMScore, bound: FilteringBoundLogger) -> bool | None:
        """Write `score`, as `store_record` does (False: its `score_id` was there already)."""
        return await self._traced(SCORE_TABLE, _store(self._scores, score, bound, "score.write_failed"))

    async def _traced(self, table: str, write: Awaitable[bool | None]) -> bool | None:
        if not tracing.ENABLED:
            return await write
        span = tracing.record_write(table, self._sink.system)
        written = None
        try:
            written = await write
            return written
        finally:
            tracing.record_written(span, written)

    async def existing_record(self, request_id: str, model_index: int) -> LLMLogRecord | None:
        """The record of that model of that request, if the sink has it (None too if it cannot say)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._existing, request_id, model_index)

    def _existing(self, request_id: str, model_index: int) -> LLMLogRecord | None:
        try:
            records = self._sink.records(request_id)
        except Exception as exc:  # the sink is down: calling again is the safe side
            log.warning(
                "record.lookup_failed",
                request_id=request_id,
                log_id=log_id_for(request_id, model_index),
                error=describe(exc),
            )
            return None
        return next((r for r in records if r.model_index == model_index), None)

    async def records(self, where: RecordFilter) -> list[LLMLogRecord]:
        """The records `where` selects.

        Raises:
            Exception: the sink's own, when it cannot be read.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, partial(self._sink.records, where=where))

    async def score_ids(self, where: RecordFilter) -> set[str]:
        """The ids of the scores of the records `where` selects.

        Raises:
            Exception: the sink's own, when it cannot be read.
        """
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._threads, self._sink.scores, where)
        return {score.score_id for score in scores}

    def close(self, timeout: float) -> bool:
        """Close the sink and its threads, once no call is left that could write; False if a sink
        thread was still busy after `timeout` seconds (a database that stopped answering), and
        both were left as they are.
        """
        closer = threading.Thread(target=self._close_now, name="sink-close", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.error("sink.close_abandoned", waited_seconds=timeout)
            return False
        return True

    def _close_now(self) -> None:
        try:
            if self._threads is not None:
                self._threads.shutdown(wait=True, cancel_futures=True)
            self._sink.close()
        except Exception as exc:  # the records are written or dead-lettered by now: nothing is lost
            log.warning("sink.close_failed", error=describe(exc))


async def _store(writer: GroupCommit[Row], row: Row, bound: FilteringBoundLogger, failed_event: str) -> bool | None:
    waits = iter(SINK_RETRY_WAITS)
    while True:
        try:
            return await writer.write(row)
        except Exception as exc:
            wait = next(waits, None)
            bound.error(failed_event, error=describe(exc), retry_in=wait)
            if wait is None:
                return None
        await asyncio.sleep(wait)

"""`GroupCommit`: writes that overlap share transactions, and every caller gets its own answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from multillm.schemas import LLMLogRecord
from multillm.sinks import Sink
from multillm.workers import group_commit
from multillm.workers.group_commit import GroupCommit
from tests.test_logs_sinks import every_sink, record


class _CountingSink:
    """A real sink that remembers the size of every batch it was given (and can be told to fail)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.batches: list[int] = []
        self.fail_with: Exception | None = None
        self.refuse: str | None = None  # a log_id the "database" refuses, failing its whole batch
        self.release = threading.Event()
        self.release.set()

    def write(self, record: LLMLogRecord) -> bool:
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        self.release.wait(10)
        self.batches.append(len(records))
        if self.fail_with:
            raise self.fail_with
        if self.refuse in {r.log_id for r in records}:
            raise ValueError(f"refused {self.refuse}")
        return self.inner.write_many(records)

    def records(
        self, request_id: str | None = None, limit: int | None = None, *, where: object = None
    ) -> list[LLMLogRecord]:
        return self.inner.records(request_id, limit)

    def close(self) -> None:
        self.inner.close()


async def _answers(grouped: GroupCommit[LLMLogRecord], records: list[LLMLogRecord]) -> dict[str, bool | BaseException]:
    """Each record's answer, written by concurrent tasks."""
    outcomes = await asyncio.gather(*(grouped.write(r) for r in records), return_exceptions=True)
    return {r.log_id: outcome for r, outcome in zip(records, outcomes, strict=True)}


async def _behind_a_held_batch(
    grouped: GroupCommit[LLMLogRecord], counting: _CountingSink, first: LLMLogRecord, later: list[LLMLogRecord]
) -> dict[str, bool | BaseException]:
    """Write `first` and hold its batch in the sink until all of `later` are queued behind it."""
    counting.release.clear()
    first_write = asyncio.ensure_future(grouped.write(first))
    await asyncio.sleep(0)  # the first batch is on its way to the sink, and held there
    answers = asyncio.ensure_future(_answers(grouped, later))
    while grouped.queued < len(later):
        await asyncio.sleep(0.001)
    counting.release.set()
    assert await first_write is True
    return await answers


@every_sink
def test_writes_that_overlap_are_stored_in_fewer_transactions_with_each_callers_answer(sink: Sink) -> None:
    counting = _CountingSink(sink)
    grouped = GroupCommit(counting.write_many)
    sink.write(record("already", index=0))
    later = [record(f"log-{i}", index=i + 2) for i in range(20)] + [record("already", index=0)]
    results = asyncio.run(_behind_a_held_batch(grouped, counting, record("first", index=1), later))
    assert results == {**{f"log-{i}": True for i in range(20)}, "already": False}
    assert counting.batches == [1, 21]  # the first alone, then everything that waited for it, together
    assert {r.log_id for r in sink.records()} == {"already", "first", *(f"log-{i}" for i in range(20))}


def test_a_failed_batch_raises_in_every_caller_of_that_batch(make_sink: object) -> None:
    counting = _CountingSink(make_sink())  # type: ignore[operator]
    observed: list[bool] = []
    grouped = GroupCommit(counting.write_many, observe=lambda seconds, failed: observed.append(failed))

    async def scenario() -> tuple[dict[str, bool | BaseException], bool]:
        counting.fail_with = OSError("disk full")
        failed = await _answers(grouped, [record(f"log-{i}", index=i) for i in range(5)])
        counting.fail_with = None
        return failed, await grouped.write(record("after", index=9))

    results, after = asyncio.run(scenario())
    assert set(results) == {f"log-{i}" for i in range(5)}
    assert all(isinstance(r, OSError) and "disk full" in str(r) for r in results.values())
    assert after is True  # a failed batch leaves the sink usable
    assert observed.count(False) == 1 and observed.count(True) >= 5


def test_a_record_the_sink_refuses_fails_only_its_own_caller(make_sink: object) -> None:
    counting = _CountingSink(make_sink())  # type: ignore[operator]
    grouped = GroupCommit(counting.write_many)
    counting.refuse = "bad"
    batch = [record(f"log-{i}", index=i + 1) for i in range(5)] + [record("bad", index=9)]
    results = asyncio.run(_behind_a_held_batch(grouped, counting, record("first", index=0), batch))
    assert {k: v for k, v in results.items() if k != "bad"} == {f"log-{i}": True for i in range(5)}
    assert isinstance(results["bad"], ValueError)
    assert counting.batches[:2] == [1, 6]  # the shared batch failed, then each record went alone
    assert {r.log_id for r in counting.inner.records()} == {"first", *(f"log-{i}" for i in range(5))}


def test_a_cancelled_caller_does_not_stop_the_others(make_sink: object) -> None:
    counting = _CountingSink(make_sink())  # type: ignore[operator]
    grouped = GroupCommit(counting.write_many)

    async def scenario() -> dict[str, bool | BaseException]:
        counting.release.clear()
        first = asyncio.ensure_future(grouped.write(record("first", index=0)))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(grouped.write(record("gone", index=1)))
        stays = asyncio.ensure_future(_answers(grouped, [record("stays", index=2)]))
        while grouped.queued < 2:
            await asyncio.sleep(0.001)
        gone.cancel()
        counting.release.set()
        assert await first is True
        return await stays

    assert asyncio.run(scenario()) == {"stays": True}


def test_more_than_a_batch_waiting_goes_in_batches_until_none_is_left(
    make_sink: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group_commit, "MAX_BATCH", 3)
    counting = _CountingSink(make_sink())  # type: ignore[operator]
    grouped = GroupCommit(counting.write_many)
    later = [record(f"log-{i}", index=i + 1) for i in range(7)]
    results = asyncio.run(_behind_a_held_batch(grouped, counting, record("first", index=0), later))
    assert results == {f"log-{i}": True for i in range(7)}
    assert counting.batches == [1, 3, 3, 1]

"""`GroupCommitSink`: concurrent writes share transactions, and every caller gets its own answer."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from multillm.schemas import LLMLogRecord
from multillm.sinks import Sink
from multillm.sinks.group_commit import GroupCommitSink
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
        self.entered = threading.Event()

    def write(self, record: LLMLogRecord) -> bool:
        return self.write_many([record])[0]

    def write_many(self, records: Sequence[LLMLogRecord]) -> list[bool]:
        self.entered.set()
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


def _write_from_threads(sink: GroupCommitSink, records: list[LLMLogRecord]) -> dict[str, bool | Exception]:
    results: dict[str, bool | Exception] = {}

    def write(r: LLMLogRecord) -> None:
        try:
            results[r.log_id] = sink.write(r)
        except Exception as exc:
            results[r.log_id] = exc

    threads = [threading.Thread(target=write, args=(r,)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return results


@every_sink
def test_writes_that_overlap_are_stored_in_fewer_transactions_with_each_callers_answer(sink: Sink) -> None:
    counting = _CountingSink(sink)
    grouped = GroupCommitSink(counting)
    sink.write(record("already", index=0))
    later = [record(f"log-{i}", index=i + 2) for i in range(20)] + [record("already", index=0)]
    results = _behind_a_held_writer(grouped, counting, record("first", index=1), later)
    assert results == {**{f"log-{i}": True for i in range(20)}, "already": False}
    assert counting.batches == [1, 21]  # the first alone, then everything that waited for it, together
    assert {r.log_id for r in sink.records()} == {"already", "first", *(f"log-{i}" for i in range(20))}
    grouped.close()


def _behind_a_held_writer(
    grouped: GroupCommitSink, counting: _CountingSink, first: LLMLogRecord, later: list[LLMLogRecord]
) -> dict[str, bool | Exception]:
    """Write `first` and hold the writer inside its batch until all of `later` queue behind it."""
    counting.release.clear()
    writer = threading.Thread(target=grouped.write, args=(first,))
    writer.start()
    assert counting.entered.wait(10)
    threading.Thread(target=_release_when_queued, args=(grouped, counting, len(later))).start()
    results = _write_from_threads(grouped, later)
    writer.join(10)
    return results


def _release_when_queued(grouped: GroupCommitSink, counting: _CountingSink, count: int) -> None:
    for _ in range(1000):
        if grouped.queued >= count:
            break
        threading.Event().wait(0.01)
    counting.release.set()


def test_a_failed_batch_raises_in_every_caller_of_that_batch(tmp_path: object, make_sink: object) -> None:
    inner = make_sink()  # type: ignore[operator]
    counting = _CountingSink(inner)
    grouped = GroupCommitSink(counting)
    counting.fail_with = OSError("disk full")
    results = _write_from_threads(grouped, [record(f"log-{i}", index=i) for i in range(5)])
    assert set(results) == {f"log-{i}" for i in range(5)}
    assert all(isinstance(r, OSError) and "disk full" in str(r) for r in results.values())
    counting.fail_with = None
    assert grouped.write(record("after", index=9)) is True  # a failed batch leaves the sink usable
    grouped.close()
    with pytest.raises(RuntimeError, match="closed"):
        grouped.write(record("too late"))


def test_a_record_the_sink_refuses_fails_only_its_own_caller(make_sink: object) -> None:
    counting = _CountingSink(make_sink())  # type: ignore[operator]
    grouped = GroupCommitSink(counting)
    counting.refuse = "bad"
    batch = [record(f"log-{i}", index=i + 1) for i in range(5)] + [record("bad", index=9)]
    results = _behind_a_held_writer(grouped, counting, record("first", index=0), batch)
    assert {k: v for k, v in results.items() if k != "bad"} == {f"log-{i}": True for i in range(5)}
    assert isinstance(results["bad"], ValueError)
    assert counting.batches[:2] == [1, 6]  # the shared batch failed, then each record went alone
    assert {r.log_id for r in counting.inner.records()} == {"first", *(f"log-{i}" for i in range(5))}
    grouped.close()

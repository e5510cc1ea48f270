"""Scenario 5: records per second of each sink, one per transaction against batches."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Final

import msgspec

from multillm.bench.common import THREE, Section, Sizes, verdict
from multillm.bench.drive import requests_for
from multillm.bench.harness import Bench
from multillm.providers import ModelResult
from multillm.records import build_record, utc_now
from multillm.schemas import V1ChatCompletionMessage, V1Choice, V1Usage
from multillm.sinks import open_sink


def _records(count: int) -> list[msgspec.Struct]:
    request = requests_for(THREE)(0)
    outcome = ModelResult(
        external_id="chatcmpl-bench",
        model="echo",
        choices=[V1Choice(index=0, message=V1ChatCompletionMessage(content="An answer of a few words."))],
        usage=V1Usage(prompt_tokens=12, completion_tokens=6, total_tokens=18),
        attempts=1,
        latency_ms=3.0,
    )
    now = utc_now()
    return [build_record(request, f"bench-{i // 3}", i % 3, outcome, now, now) for i in range(count)]


def sinks(bench: Bench, sizes: Sizes, postgres_url: str | None) -> Section:
    """Records per second: one per transaction against batches of `BATCH`."""
    urls = {
        "jsonl": f"jsonl:///{bench.folder}/records-%s.jsonl",
        "sqlite": f"sqlite:///{bench.folder}/records-%s.db",
    }
    rows: list[list[str]] = []
    verdicts: list[str] = []
    notes = [f"batched = `write_many` with {BATCH} records per call (one transaction each)."]
    records = _records(sizes.sink_records)
    with contextlib.ExitStack() as stack:
        if postgres_url:
            urls["postgresql"] = stack.enter_context(_scratch_database(postgres_url)) + "#%s"
        else:
            notes.append("PostgreSQL: not measured (no server answered).")
        for name, url in urls.items():
            single = _sink_rate(url % "single", records, batch=1)
            batched = _sink_rate(url % "batched", records, batch=BATCH)
            rows.append([name, f"{single:.0f}", f"{batched:.0f}", f"{batched / single:.1f}"])
            if name == "sqlite":
                verdicts.append(verdict("batched SQLite records/s", batched, 20000, at_most=False))
    return Section(
        name="sinks",
        title=f"5. Sinks: records per second ({sizes.sink_records} records)",
        headers=["sink", "one per transaction", "batched", "speed-up"],
        rows=rows,
        verdicts=verdicts,
        notes=notes,
    )


BATCH: Final = 100


def _sink_rate(url: str, records: list[msgspec.Struct], *, batch: int) -> float:
    sink = open_sink(url.split("#")[0])
    try:
        started = time.perf_counter()
        if batch == 1:
            for record in records:
                sink.write(record)  # type: ignore[arg-type]
        else:
            for i in range(0, len(records), batch):
                sink.write_many(records[i : i + batch])  # type: ignore[arg-type]
        return len(records) / (time.perf_counter() - started)
    finally:
        sink.close()


@contextlib.contextmanager
def _scratch_database(postgres_url: str) -> Iterator[str]:
    """A database of its own on the server at `postgres_url`, dropped afterwards."""
    import psycopg

    name = f"multillm_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

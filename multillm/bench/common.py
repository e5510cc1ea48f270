"""What the scenarios share: the models they ask for, their sizes, their result, worker processes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import msgspec

from multillm.bench.harness import Bench
from multillm.config import StreamConfig
from multillm.testbed.processes import WorkerProcess

ONE: Final = ["mock/echo"]
THREE: Final = ["mock/echo", "mock/upper", "mock/reverse"]


def models_of(count: int) -> list[str]:
    return [*THREE, *(f"mock/m{i}" for i in range(3, count))][:count]


class Sizes(msgspec.Struct, frozen=True):
    """How much each scenario does: `quick` keeps every scenario to seconds (the smoke test)."""

    overhead_samples: int = 300
    throughput_requests: int = 3000
    throughput_in_flight: int = 200
    # Throughput rounds per system, best kept: on a shared host one system's round can fall in
    # a bad minute (eight runs on 2026-12-03: multillm 366-515, Celery 247-348 requests/s).
    rounds: int = 3
    slow_seconds: int = 8
    slow_concurrency: tuple[int, ...] = (32, 128, 512)
    fanout_requests: int = 1500
    sink_records: int = 10000
    scale_requests: int = 2000
    scale_processes: tuple[int, ...] = (1, 2, 4)
    stream_samples: int = 300
    stream_concurrency: int = 64
    stream_requests: int = 256
    # `[stream] flush_ms` settings the load runs with (the default among them is judged).
    stream_flush_ms: tuple[float, ...] = (0.0, 25.0, 50.0, 100.0)
    # Enough that p99 is ten requests, not three: one stall alone does not decide it.
    tail_samples: int = 1000
    burst_concurrency: tuple[int, ...] = (64, 256)
    burst_latency_s: float = 1.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            overhead_samples=10,
            throughput_requests=60,
            throughput_in_flight=20,
            rounds=1,
            slow_seconds=2,
            slow_concurrency=(8, 32),
            fanout_requests=30,
            sink_records=200,
            scale_requests=40,
            scale_processes=(1, 2),
            stream_samples=10,
            stream_concurrency=8,
            stream_requests=16,
            stream_flush_ms=(StreamConfig().flush_ms,),
            tail_samples=10,
            burst_concurrency=(8,),
            burst_latency_s=0.2,
        )


class Section(msgspec.Struct):
    name: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    verdicts: list[str] = msgspec.field(default_factory=list)
    notes: list[str] = msgspec.field(default_factory=list)
    # Latency samples in ms by series name, for the chart.
    samples: dict[str, list[float]] = msgspec.field(default_factory=dict)


def ms(value: float) -> str:
    return f"{value:.2f}"


def verdict(what: str, value: float, limit: float, *, at_most: bool) -> str:
    met = value <= limit if at_most else value >= limit
    sign = "≤" if at_most else "≥"
    return f"{'met' if met else 'MISSED'}: {what} {value:.2f} (target {sign} {limit:g})"


@contextlib.contextmanager
def primary(
    bench: Bench,
    concurrency: int,
    count: int = 1,
    extra: Sequence[str] = (),
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[list[WorkerProcess]]:
    with bench.workers(["primary", "--concurrency", str(concurrency), *extra], count, config, env) as workers:
        yield workers


@contextlib.contextmanager
def model_workers(bench: Bench, models: Sequence[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(bench.workers(["model", "--model", model, "--concurrency", "4"]))
        yield

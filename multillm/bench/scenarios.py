"""The six scenarios of `multillm bench`. Each measures ours and its baseline in the same run.

Every scenario returns a `Section`: a table for people, the target verdicts, and
the raw samples the chart draws.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import msgspec
import openai

from multillm import contract
from multillm.bench import bare
from multillm.bench.drive import MakeRequest, Run, keep_in_flight, percentile, requests_for
from multillm.bench.harness import Bench, CpuShares, broker_pid, cpu_seconds, peak_rss_mb, python_module
from multillm.cli.processes import WorkerProcess
from multillm.producers import Client
from multillm.providers import ModelResult
from multillm.records import build_record, utc_now
from multillm.schemas import V1ChatCompletionMessage, V1Choice, V1Usage, encode
from multillm.sinks import open_sink

ONE: Final = ["mock/echo"]
THREE: Final = ["mock/echo", "mock/upper", "mock/reverse"]


def models_of(count: int) -> list[str]:
    return [*THREE, *(f"mock/m{i}" for i in range(3, count))][:count]


class Sizes(msgspec.Struct, frozen=True):
    """How much each scenario does: `quick` keeps every scenario to seconds (the smoke test)."""

    overhead_samples: int = 300
    throughput_requests: int = 3000
    throughput_in_flight: int = 200
    rounds: int = 2
    slow_seconds: int = 8
    slow_concurrency: tuple[int, ...] = (32, 128, 512)
    fanout_requests: int = 1500
    sink_records: int = 10000
    scale_requests: int = 2000
    scale_processes: tuple[int, ...] = (1, 2, 4)

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


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _verdict(what: str, value: float, limit: float, *, at_most: bool) -> str:
    met = value <= limit if at_most else value >= limit
    sign = "≤" if at_most else "≥"
    return f"{'met' if met else 'MISSED'}: {what} {value:.2f} (target {sign} {limit:g})"


@contextlib.contextmanager
def _primary(bench: Bench, concurrency: int, count: int = 1) -> Iterator[list[WorkerProcess]]:
    with bench.workers(["primary", "--concurrency", str(concurrency)], count) as workers:
        yield workers


@contextlib.contextmanager
def _model_workers(bench: Bench, models: Sequence[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(bench.workers(["model", "--model", model, "--concurrency", "4"]))
        yield


# --- 1. overhead -------------------------------------------------------------


def overhead(bench: Bench, sizes: Sizes) -> Section:
    """One request at a time: `Client.create` against a bare RPC round trip plus a bare SDK call."""
    bench.set_latency(0)
    bench.declare(THREE)
    rows: list[list[str]] = []
    verdicts: list[str] = []
    samples: dict[str, list[float]] = {}
    echo = python_module("multillm.bench.bare", "echo", "--broker-url", bench.broker_url)
    sdk = openai.OpenAI(base_url=bench.mock_url, api_key="unused", max_retries=0)
    with Client(bench.broker_url) as client, bench.child(echo, bare.ECHO_QUEUE):
        rpc = bare.RpcCaller(bench.broker_url)
        try:
            for models in (ONE, THREE):
                make = requests_for(models)
                body = encode(make(0))

                def floor(i: int, body: bytes = body) -> None:
                    rpc.call(body)
                    sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])

                def ours(i: int, make: MakeRequest = make) -> None:
                    client.create(make(i))

                with _primary(bench, 4), _model_workers(bench, models[1:]):
                    mine, base = _interleaved(ours, floor, sizes.overhead_samples)
                label = f"{len(models)} model{'s' if len(models) > 1 else ''}"
                p50 = percentile(mine, 0.5) / percentile(base, 0.5)
                p99 = percentile(mine, 0.99) / percentile(base, 0.99)
                figures = [percentile(base, 0.5), percentile(base, 0.99), percentile(mine, 0.5), percentile(mine, 0.99)]
                rows.append([label, *map(_ms, figures), f"{p50:.2f}", f"{p99:.2f}"])
                samples[f"floor ({label})"], samples[f"multillm ({label})"] = base, mine
                if models is ONE:
                    verdicts += [
                        _verdict("overhead p50 / floor", p50, 1.3, at_most=True),
                        _verdict("overhead p99 / floor", p99, 1.75, at_most=True),
                    ]
        finally:
            rpc.close()
    bench.purge()
    return Section(
        name="overhead",
        title="1. Overhead: one request at a time, mock latency 0 (ms)",
        headers=["models", "floor p50", "floor p99", "multillm p50", "multillm p99", "p50 ratio", "p99 ratio"],
        rows=rows,
        verdicts=verdicts,
        notes=[
            "floor = a bare pika RPC round trip through the same broker (quorum queue, persistent, confirms) "
            "plus a bare openai SDK call to the same mock; the two are sampled alternately, one by one.",
        ],
        samples=samples,
    )


def _interleaved(
    ours: Callable[[int], object], floor: Callable[[int], object], count: int
) -> tuple[list[float], list[float]]:
    """Alternate the two sample by sample (and which goes first), so drift hits both alike."""
    for i in range(min(20, count)):  # warm connections and caches on both sides
        ours(i)
        floor(i)
    timed: tuple[list[float], list[float]] = ([], [])
    for i in range(count):
        order = (0, 1) if i % 2 else (1, 0)
        for side in order:
            started = time.perf_counter()
            (ours, floor)[side](i)
            timed[side].append((time.perf_counter() - started) * 1000)
    return timed


# --- 2. throughput -----------------------------------------------------------


def throughput(bench: Bench, sizes: Sizes) -> Section:
    """Many requests in flight, one worker process: ours, the bare pika loop, Celery."""
    bench.set_latency(0)
    bench.declare(THREE)
    rows: list[list[str]] = []
    verdicts: list[str] = []
    with Client(bench.broker_url) as client:
        for models in (ONE, THREE):
            best: dict[str, tuple[Run, float]] = {}
            for _ in range(sizes.rounds):
                for name, measured in _throughput_round(bench, client, models, sizes).items():
                    if name not in best or measured[0].per_second > best[name][0].per_second:
                        best[name] = measured
            for name, (run, cpu) in best.items():
                rows.append(
                    [
                        str(len(models)),
                        name,
                        f"{run.per_second:.0f}",
                        _ms(percentile(run.latencies_ms, 0.5)),
                        _ms(percentile(run.latencies_ms, 0.99)),
                        f"{cpu * 1000 / run.requests:.2f}",
                        str(run.errors),
                    ]
                )
            ours, loop, celery = (best[k][0].per_second for k in ("multillm", "bare pika loop", "celery"))
            what = f"{len(models)} model{'s' if len(models) > 1 else ''}"
            verdicts += [
                _verdict(f"throughput / bare pika loop ({what})", ours / loop, 0.9, at_most=False),
                _verdict(f"throughput / celery ({what})", ours / celery, 1.3, at_most=False),
            ]
    return Section(
        name="throughput",
        title="2. Throughput: mock latency 0, one worker process, "
        f"{sizes.throughput_requests} requests, {sizes.throughput_in_flight} in flight",
        headers=["models", "system", "requests/s", "p50 ms", "p99 ms", "worker CPU ms/request", "errors"],
        rows=rows,
        verdicts=verdicts,
        notes=[
            f"Best of {sizes.rounds} rounds each, the systems taking turns. multillm: `worker primary "
            f"--concurrency {THROUGHPUT_CONCURRENCY}` with an SQLite sink. Bare pika loop: "
            f"{THROUGHPUT_CONCURRENCY} consumer threads, one connection each, prefetch 1, confirms, no records. "
            f"Celery: `--pool threads --concurrency {THROUGHPUT_CONCURRENCY}`, RPC result backend, acks late.",
        ],
    )


THROUGHPUT_CONCURRENCY: Final = 8


def _throughput_round(bench: Bench, client: Client, models: list[str], sizes: Sizes) -> dict[str, tuple[Run, float]]:
    """One run of each system; (the run, the worker process's CPU seconds)."""
    make = requests_for(models)
    total, in_flight = sizes.throughput_requests, sizes.throughput_in_flight
    results: dict[str, tuple[Run, float]] = {}
    with _primary(bench, THROUGHPUT_CONCURRENCY) as (worker,):
        results["multillm"] = _with_cpu(
            worker.pid, lambda: keep_in_flight(client, make, total=total, in_flight=in_flight)
        )
    bench.purge()
    loop = python_module(
        "multillm.bench.bare",
        "loop",
        "--broker-url",
        bench.broker_url,
        "--mock-url",
        bench.mock_url,
        "--threads",
        str(THROUGHPUT_CONCURRENCY),
    )
    with bench.child(loop, contract.REQUEST_QUEUE, consumers=THROUGHPUT_CONCURRENCY) as process:
        results["bare pika loop"] = _with_cpu(
            process.pid, lambda: keep_in_flight(client, make, total=total, in_flight=in_flight)
        )
    bench.purge()
    results["celery"] = _celery_round(bench, models, total, in_flight)
    bench.purge()
    return results


def _with_cpu(pid: int, run: Callable[[], Run]) -> tuple[Run, float]:
    before = cpu_seconds(pid)
    result = run()
    return result, cpu_seconds(pid) - before


def _celery_round(bench: Bench, models: list[str], total: int, in_flight: int) -> tuple[Run, float]:
    from multillm.bench import celery_peer
    from multillm.bench.drive import windowed

    celery_peer.app.conf.broker_url = bench.broker_url
    worker = python_module(
        "celery",
        "-A",
        "multillm.bench.celery_peer",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(THROUGHPUT_CONCURRENCY),
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    )
    messages = [{"role": "user", "content": "Say something short about message queues."}]
    with bench.child(worker, celery_peer.QUEUE) as process:

        def submit(i: int) -> Callable[[], object]:
            result = celery_peer.complete.delay(models, messages)
            return lambda: result.get(timeout=120)

        outcome = _with_cpu(process.pid, lambda: windowed(submit, total=total, in_flight=in_flight))
    return outcome


# --- 3. slow models ----------------------------------------------------------


def slow_models(bench: Bench, sizes: Sizes) -> Section:
    """Mock latency 1 s: does one worker process keep `concurrency` calls in flight, and at what memory?"""
    latency_s = 1.0
    bench.set_latency(latency_s * 1000)
    bench.declare(ONE)
    rows: list[list[str]] = []
    verdicts: list[str] = []
    samples: dict[str, list[float]] = {}
    with Client(bench.broker_url, pool_size=4) as client:
        for concurrency in sizes.slow_concurrency:
            with _primary(bench, concurrency) as (worker,):
                run = keep_in_flight(
                    client,
                    requests_for(ONE),
                    total=concurrency * sizes.slow_seconds,
                    in_flight=concurrency,
                    ramp_seconds=latency_s,
                )
                rss = peak_rss_mb(worker.pid)
            bound = concurrency / latency_s
            rate = run.steady_per_second
            p99 = percentile(run.latencies_ms, 0.99)
            rows.append(
                [
                    str(concurrency),
                    f"{rate:.1f}",
                    f"{bound:.0f}",
                    f"{rate / bound:.2f}",
                    _ms(percentile(run.latencies_ms, 0.5)),
                    _ms(p99),
                    f"{rss:.0f}",
                    str(run.errors),
                ]
            )
            samples[f"concurrency {concurrency}"] = run.latencies_ms
            verdicts += [
                _verdict(f"throughput / bound at {concurrency}", rate / bound, 0.9, at_most=False),
                _verdict(f"p99 seconds at {concurrency}", p99 / 1000, 1.2, at_most=True),
            ]
            if concurrency >= 512:
                verdicts.append(_verdict(f"peak RSS MB at {concurrency}", rss, 300, at_most=True))
    bench.set_latency(0)
    bench.purge()
    return Section(
        name="slow",
        title=f"3. Slow models: mock latency {latency_s:g} s, one primary worker process",
        headers=["concurrency", "requests/s", "bound", "ratio", "p50 ms", "p99 ms", "peak RSS MB", "errors"],
        rows=rows,
        verdicts=verdicts,
        notes=[
            "bound = concurrency / latency. The driver keeps exactly `concurrency` requests in flight for "
            f"{sizes.slow_seconds} rounds, so the latency is the model's plus ours, with no queueing in front. "
            "The first `concurrency` requests are spread over one latency (all at once, they would finish and "
            "restart together, in waves), and requests/s counts the steady middle of the run: the replies "
            "between the 20th and 80th percentile of reply times.",
        ],
        samples=samples,
    )


# --- 4. fan-out cost ---------------------------------------------------------


def fanout_cost(bench: Bench, sizes: Sizes) -> Section:
    """CPU time per request of the primary worker as the request names more models."""
    bench.set_latency(0)
    rows: list[list[str]] = []
    with Client(bench.broker_url) as client:
        for count in (1, 3, 8):
            models = models_of(count)
            bench.declare(models)
            with _primary(bench, THROUGHPUT_CONCURRENCY) as (worker,):
                keep_in_flight(client, requests_for(models), total=20, in_flight=10)  # warm up
                run, cpu = _with_cpu(
                    worker.pid,
                    lambda models=models: keep_in_flight(  # type: ignore[misc]
                        client, requests_for(models), total=sizes.fanout_requests, in_flight=64
                    ),
                )
            rows.append([str(count), f"{cpu * 1000 / run.requests:.3f}", f"{run.per_second:.0f}"])
            bench.purge()
    base = float(rows[0][1])
    for row in rows:
        row.append(f"{float(row[1]) / base:.2f}")
    return Section(
        name="fanout",
        title="4. Fan-out cost: the primary worker's CPU per request (mock latency 0)",
        headers=["models", "CPU ms/request", "requests/s", "vs 1 model"],
        rows=rows,
        notes=["Each extra model costs one fan-out copy: encoded, published and confirmed before the primary call."],
    )


# --- 5. sinks ----------------------------------------------------------------


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
                verdicts.append(_verdict("batched SQLite records/s", batched, 20000, at_most=False))
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
    import uuid

    import psycopg

    name = f"multillm_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- 6. horizontal scale -----------------------------------------------------


def horizontal(bench: Bench, sizes: Sizes) -> Section:
    """Throughput with more primary worker processes on one queue, and who used the CPU meanwhile."""
    bench.declare(ONE)
    rows: list[list[str]] = []
    concurrency = 16
    broker = broker_pid()
    with Client(bench.broker_url) as client:
        for latency_ms in (0, 200):
            bench.set_latency(latency_ms)
            base = 0.0
            for processes in sizes.scale_processes:
                in_flight = processes * concurrency * (1 if latency_ms else 4)
                with _primary(bench, concurrency, processes) as workers:
                    pids = {
                        "workers": [w.pid for w in workers],
                        "broker": [broker] if broker else [],
                        "mock": [bench.mock_pid],
                        "driver": [os.getpid()],
                    }
                    shares = CpuShares(pids)
                    run = keep_in_flight(
                        client,
                        requests_for(ONE),
                        total=sizes.scale_requests,
                        in_flight=in_flight,
                        ramp_seconds=latency_ms / 1000,
                    )
                    cpu = shares.stop()
                rate = run.steady_per_second
                base = base or rate
                bound = f"{processes * concurrency * 1000 / latency_ms:.0f}" if latency_ms else "-"
                rows.append(
                    [
                        str(latency_ms),
                        str(processes),
                        f"{rate:.0f}",
                        bound,
                        f"{rate / base:.2f}",
                        _ms(percentile(run.latencies_ms, 0.99)),
                        *(f"{cpu[k]:.0f}" for k in ("workers", "broker", "mock", "driver", "machine")),
                    ]
                )
                bench.purge()
    bench.set_latency(0)
    return Section(
        name="scale",
        title=f"6. Horizontal scale: primary worker processes on one queue (--concurrency {concurrency} each)",
        headers=[
            "mock latency ms",
            "processes",
            "requests/s",
            "bound",
            "vs 1 process",
            "p99 ms",
            "CPU % workers",
            "broker",
            "mock",
            "driver",
            f"machine (of {100 * (os.cpu_count() or 1)})",
        ],
        rows=rows,
        notes=[
            "CPU % is of one core, over the run: the workers together, the RabbitMQ VM, the mock LLM, the "
            "benchmark's own client, and the whole machine. requests/s is the steady middle of the run."
        ],
    )

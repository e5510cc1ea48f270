"""Scenarios 2 and 4: requests per second against the bare pika loop and Celery; CPU per request as
requests name more models."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Final

from multillm import contract
from multillm.bench.common import ONE, THREE, Section, Sizes, models_of, ms, primary, verdict
from multillm.bench.drive import PROMPT, Run, keep_in_flight, percentile, requests_for, windowed
from multillm.bench.harness import Bench, cpu_seconds, python_module
from multillm.producers import Client


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
                        ms(percentile(run.latencies_ms, 0.5)),
                        ms(percentile(run.latencies_ms, 0.99)),
                        f"{cpu * 1000 / run.requests:.2f}",
                        str(run.errors),
                    ]
                )
            ours, loop, celery = (best[k][0].per_second for k in ("multillm", "bare pika loop", "celery"))
            what = f"{len(models)} model{'s' if len(models) > 1 else ''}"
            verdicts += [
                verdict(f"throughput / bare pika loop ({what})", ours / loop, 0.9, at_most=False),
                verdict(f"throughput / celery ({what})", ours / celery, 1.3, at_most=False),
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
    with primary(bench, THROUGHPUT_CONCURRENCY) as (worker,):
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
    from multillm.bench import celery_peer  # the bench extra: imported only when Celery is measured

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
    messages = [{"role": "user", "content": PROMPT}]
    with bench.child(worker, celery_peer.QUEUE) as process:

        def submit(i: int) -> Callable[[], object]:
            result = celery_peer.complete.delay(models, messages)
            return lambda: result.get(timeout=120)

        outcome = _with_cpu(process.pid, lambda: windowed(submit, total=total, in_flight=in_flight))
    return outcome


def fanout_cost(bench: Bench, sizes: Sizes) -> Section:
    """CPU time per request of the primary worker as the request names more models."""
    bench.set_latency(0)
    rows: list[list[str]] = []
    with Client(bench.broker_url) as client:
        for count in (1, 3, 8):
            models = models_of(count)
            bench.declare(models)
            with primary(bench, THROUGHPUT_CONCURRENCY) as (worker,):
                keep_in_flight(client, requests_for(models), total=20, in_flight=10)  # warm up
                run, cpu = _with_cpu(
                    worker.pid,
                    partial(keep_in_flight, client, requests_for(models), total=sizes.fanout_requests, in_flight=64),
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
        notes=[
            "Each extra model costs one fan-out copy: encoded, published, its confirm awaited after the primary call."
        ],
    )

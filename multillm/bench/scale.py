"""Scenario 6: more primary worker processes on one queue, and who used the CPU meanwhile."""

from __future__ import annotations

import os

from multillm.bench.common import ONE, Section, Sizes, ms, primary
from multillm.bench.drive import keep_in_flight, percentile, requests_for
from multillm.bench.harness import Bench, CpuShares, broker_pid
from multillm.producers import Client


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
                with primary(bench, concurrency, processes) as workers:
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
                        ms(percentile(run.latencies_ms, 0.99)),
                        *(f"{cpu[k]:.0f}" for k in ("workers", "broker", "mock", "driver", "machine", "stolen")),
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
            "stolen",
        ],
        rows=rows,
        notes=[
            "CPU % is of one core, over the run: the workers together, the RabbitMQ VM, the mock LLM, the "
            "benchmark's own client, the whole machine, and what the host stole from it (its steal time: "
            "this virtual machine ready to run, another tenant running). requests/s is the steady middle of the run."
        ],
    )

"""Scenario 3: slow models at high concurrency: throughput against concurrency / latency, p99, memory."""

from __future__ import annotations

from multillm.bench.common import ONE, Section, Sizes, ms, primary, verdict
from multillm.bench.drive import keep_in_flight, percentile, requests_for
from multillm.bench.harness import Bench, CpuShares, free_port, histogram_quantile, peak_rss_mb
from multillm.metrics import LOOP_LAG
from multillm.producers import Client

# Steal time (% of one core) past which a row gets a note: on the EPYC, runs at 512 with 1-5%
# stolen gave 0.82-0.92 of the bound against 0.87-0.97 with none (docs/benchmarks.md).
_STOLEN_NOTED = 3.0


def slow_models(bench: Bench, sizes: Sizes) -> Section:
    """Mock latency 1 s: does one worker process keep `concurrency` calls in flight, and at what memory?"""
    latency_s = 1.0
    bench.set_latency(latency_s * 1000)
    bench.declare(ONE)
    rows: list[list[str]] = []
    verdicts: list[str] = []
    samples: dict[str, list[float]] = {}
    stolen_notes: list[str] = []
    with Client(bench.broker_url, pool_size=4) as client:
        for concurrency in sizes.slow_concurrency:
            port = free_port()
            with primary(bench, concurrency, extra=["--metrics-port", str(port)]) as (worker,):
                shares = CpuShares({"worker": [worker.pid]})
                run = keep_in_flight(
                    client,
                    requests_for(ONE),
                    total=concurrency * sizes.slow_seconds,
                    in_flight=concurrency,
                    ramp_seconds=latency_s,
                )
                cpu = shares.stop()
                rss = peak_rss_mb(worker.pid)
                lag = [histogram_quantile(port, LOOP_LAG, q) * 1000 for q in (0.5, 0.99)]
            bound = concurrency / latency_s
            rate = run.steady_per_second
            p99 = percentile(run.latencies_ms, 0.99)
            rows.append(
                [
                    str(concurrency),
                    f"{rate:.1f}",
                    f"{bound:.0f}",
                    f"{rate / bound:.2f}",
                    ms(percentile(run.latencies_ms, 0.5)),
                    ms(p99),
                    f"{rss:.0f}",
                    f"{lag[0]:.1f} / {lag[1]:.0f}",
                    f"{cpu['worker']:.0f}",
                    f"{cpu['stolen']:.0f}",
                    str(run.errors),
                ]
            )
            samples[f"concurrency {concurrency}"] = run.latencies_ms
            verdicts += [
                verdict(f"throughput / bound at {concurrency}", rate / bound, 0.9, at_most=False),
                verdict(f"p99 seconds at {concurrency}", p99 / 1000, 1.2, at_most=True),
            ]
            if concurrency >= 512:
                verdicts.append(verdict(f"peak RSS MB at {concurrency}", rss, 300, at_most=True))
            if cpu["stolen"] >= _STOLEN_NOTED:
                stolen_notes.append(
                    f"At concurrency {concurrency} the host stole {cpu['stolen']:.0f}% of a core from this machine: "
                    "that row measures the host's other tenants as much as the worker."
                )
    bench.set_latency(0)
    bench.purge()
    return Section(
        name="slow",
        title=f"3. Slow models: mock latency {latency_s:g} s, one primary worker process",
        headers=[
            "concurrency",
            "requests/s",
            "bound",
            "ratio",
            "p50 ms",
            "p99 ms",
            "peak RSS MB",
            "loop lag p50 / p99 ms",
            "worker CPU %",
            "stolen %",
            "errors",
        ],
        rows=rows,
        verdicts=verdicts,
        notes=[
            "bound = concurrency / latency. The driver keeps exactly `concurrency` requests in flight for "
            f"{sizes.slow_seconds} rounds, so the latency is the model's plus ours, with no queueing in front. "
            "The first `concurrency` requests are spread over one latency (all at once, they would finish and "
            "restart together, in waves), and requests/s counts the steady middle of the run: the replies "
            "between the 20th and 80th percentile of reply times.",
            "loop lag = how late the worker's event loop ran its quarter-second timer "
            f"(`{LOOP_LAG}` over the worker's life at that concurrency, ramp included; "
            "quantiles as PromQL's `histogram_quantile` gives them): "
            "past a few ms, the process is short of CPU and every request waits for its turn on the loop.",
            "worker CPU % is of one core, over the run. stolen % = the host's steal time over the run, in % of "
            "one core: time this virtual machine was ready to run and the hypervisor ran another tenant; "
            "a few % of it is enough to move the 512 row.",
            *stolen_notes,
        ],
        samples=samples,
    )

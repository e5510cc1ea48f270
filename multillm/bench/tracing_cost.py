"""Scenario 10: what exporting traces costs a primary worker, against the same worker not exporting.

The worker runs with the environment that turns tracing on (an OTLP endpoint: a receiver in
this process that decodes and counts the spans) and without it, in turns: the latency of one
request at a time, then requests/s with many in flight. Off is how every other scenario runs.
"""

from __future__ import annotations

from multillm.bench.common import ONE, Section, Sizes, ms, primary
from multillm.bench.drive import keep_in_flight, percentile, requests_for
from multillm.bench.harness import Bench
from multillm.bench.throughput import THROUGHPUT_CONCURRENCY
from multillm.producers import Client
from multillm.testbed.otlp import OtlpReceiver


def tracing_cost(bench: Bench, sizes: Sizes) -> Section:
    bench.set_latency(0)
    bench.declare(ONE)
    make = requests_for(ONE)
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with OtlpReceiver(keep=False) as receiver, Client(bench.broker_url) as client:
        environments = {"off": {}, "on": {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}}
        for _ in range(sizes.rounds):
            for mode, env in environments.items():
                with primary(bench, THROUGHPUT_CONCURRENCY, env=env):
                    for i in range(20):  # warm: connections, the exporter's first batch
                        client.create(make(i))
                    one_at_a_time = keep_in_flight(client, make, total=sizes.overhead_samples, in_flight=1)
                    latencies[mode] += one_at_a_time.latencies_ms
                    many = keep_in_flight(
                        client, make, total=sizes.throughput_requests, in_flight=sizes.throughput_in_flight
                    )
                    rates[mode].append(many.per_second)
                bench.purge()
        spans = receiver.count
    rows = []
    for mode in ("off", "on"):
        rows.append(
            [
                mode,
                ms(percentile(latencies[mode], 0.5)),
                ms(percentile(latencies[mode], 0.99)),
                f"{max(rates[mode]):.0f}",
            ]
        )
    p50 = percentile(latencies["on"], 0.5) / percentile(latencies["off"], 0.5)
    rate = max(rates["on"]) / max(rates["off"])
    return Section(
        name="tracing",
        title="10. Tracing: the primary worker exporting spans (OTLP/HTTP) against not, mock latency 0",
        headers=["tracing", "p50 ms (one at a time)", "p99 ms", "requests/s (many in flight)"],
        rows=rows,
        notes=[
            f"With tracing, latency p50 {p50:.2f}x and throughput {rate:.2f}x the same worker without: the "
            "SDK's spans (four for a one-model request) and their export, on the worker's CPU. No target for on: "
            "off must cost nothing, and off is the code path of every other scenario (the message path reads "
            "one flag). Sampling (`OTEL_TRACES_SAMPLER`, read by the SDK) cuts the cost for a busy fleet.",
            f"`worker primary --concurrency {THROUGHPUT_CONCURRENCY}`, one model, an SQLite sink; the two "
            f"settings take turns, {sizes.rounds} rounds each: {sizes.overhead_samples} requests one at a "
            f"time, then {sizes.throughput_requests} with {sizes.throughput_in_flight} in flight (the best "
            f"round's requests/s). On: `OTEL_EXPORTER_OTLP_ENDPOINT` names a receiver in the benchmark's "
            f"process, which decoded {spans} spans. Off: no `OTEL_*` variable, as everywhere else.",
        ],
        samples={"tracing off": latencies["off"], "tracing on": latencies["on"]},
    )

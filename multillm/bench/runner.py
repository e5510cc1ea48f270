"""Running the chosen scenarios in one scratch environment."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from multillm.bench import (
    SCENARIOS,
    cluster,
    outside,
    overhead,
    scale,
    sink_rates,
    slow,
    streaming,
    throughput,
    tracing_cost,
)
from multillm.bench.common import Section, Sizes
from multillm.bench.harness import Bench, bench_environment


def run_bench(
    broker_url: str,
    *,
    only: Sequence[str] = (),
    quick: bool = False,
    postgres_url: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[Section]:
    """Run the scenarios named in `only` (all by default) in a scratch vhost; their sections in order."""
    sizes = Sizes.quick() if quick else Sizes()
    chosen = [name for name in SCENARIOS if not only or name in only]
    runners: dict[str, Callable[[Bench], list[Section]]] = {
        "overhead": lambda b: [overhead.overhead(b, sizes)],
        "throughput": lambda b: [throughput.throughput(b, sizes)],
        "slow": lambda b: [slow.slow_models(b, sizes)],
        "fanout": lambda b: [throughput.fanout_cost(b, sizes)],
        "sinks": lambda b: [sink_rates.sinks(b, sizes, postgres_url)],
        "scale": lambda b: [scale.horizontal(b, sizes)],
        "cluster": lambda b: [cluster.cluster_cost(b, sizes)],
        "streaming": lambda b: [streaming.time_to_first_token(b, sizes), streaming.stream_load(b, sizes)],
        "tracing": lambda b: [tracing_cost.tracing_cost(b, sizes)],
        "tail": lambda b: [outside.tail(b, sizes)],
        "burst": lambda b: [outside.burst(b, sizes)],
    }
    sections = []
    with bench_environment(broker_url) as bench:
        for number, name in enumerate(chosen, 1):
            progress(f"[{number}/{len(chosen)}] {name}: {SCENARIOS[name]}")
            sections += runners[name](bench)
    return sections


__all__ = ["run_bench"]

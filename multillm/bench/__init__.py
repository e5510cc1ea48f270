"""`multillm bench`: what the pipeline costs on top of the broker and the model, against baselines.

Each scenario measures ours and its baseline in the same run (see `scenarios`);
`report` prints the tables, and writes them with the machine's details into
docs/benchmarks.md beside a chart of latency percentiles. Celery and matplotlib
come with the `bench` extra.
"""

from __future__ import annotations

from typing import Final

# Kept here, light to import, because the CLI's parser offers them as choices.
SCENARIOS: Final[dict[str, str]] = {
    "overhead": "latency of one request against the floor",
    "throughput": "requests/s against a bare pika loop and Celery",
    "slow": "1 s models at high concurrency: throughput, p99, memory",
    "fanout": "CPU per request with 1, 3 and 8 models",
    "sinks": "records/s per sink, batched and not",
    "scale": "1, 2, 4 worker processes on one queue",
    "cluster": "one node against a three-node cluster (scripts/cluster.sh): what replication costs",
    "streaming": "time to first token against the floor; tokens/s of 64 streams at once",
    "tracing": "a primary worker exporting OpenTelemetry spans against the same worker not",
    "tail": "seen from outside: a raw pika caller, a mock not ours; p50 and p99 against the floor",
    "burst": "seen from outside: 4x the concurrency at once, a 1 s model; the last reply against 4 s",
}

# Where the Celery peer finds the broker and the mock: `celery worker` starts it as a module,
# so it reads them from its environment at import (the bare baselines take arguments instead).
ENV_BENCH_BROKER: Final = "MULTILLM_BENCH_BROKER"
ENV_BENCH_MOCK: Final = "MULTILLM_BENCH_MOCK"

__all__ = ["ENV_BENCH_BROKER", "ENV_BENCH_MOCK", "SCENARIOS"]

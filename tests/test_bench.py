"""`multillm bench --quick`: every scenario runs end to end, so that the benchmark cannot rot.

Its figures are not asserted (the machines are noisy); what is asserted is that
each scenario measured something, against its baseline, and wrote it down.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, start_http_server

from multillm.bench import SCENARIOS
from multillm.bench.harness import CpuShares, histogram_quantile
from multillm.metrics import WorkerMetrics, serve
from multillm.testbed.rabbitmq import rabbitmqctl
from tests.conftest import ADMIN_URL

HAND_WRITTEN = (
    "# Benchmarks\n\nAnalysis that a new run must keep.\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\nTail.\n"
)


# About 70 s on an idle machine, and a loaded one (or a fresh clone compiling its imports) has
# taken over the suite's 180 s default: its own limit, under the subprocess's.
@pytest.mark.timeout(600)
# Its cluster scenario starts and stops the local cluster: never beside the cluster's tests.
@pytest.mark.serial
def test_quick_bench_runs_every_scenario_and_writes_tables_and_chart(tmp_path: Path, rabbit_cluster: object) -> None:
    """`rabbit_cluster`: the cluster scenario finds the run's cluster up and leaves it so."""
    before = _bench_vhosts()
    page = tmp_path / "benchmarks.md"
    page.write_text(HAND_WRITTEN)
    env = {**os.environ, "MULTILLM_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/%2F"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "multillm",
            "--log-level",
            "error",
            "bench",
            "--quick",
            "--output",
            str(page),
            "--postgres-url",
            ADMIN_URL,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for number in range(1, len(SCENARIOS) + 1):
        assert f"[{number}/{len(SCENARIOS)}]" in done.stderr  # progress, one line per scenario

    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nAnalysis that a new run must keep.") and text.endswith("Tail.\n")
    assert "\nold\n" not in text
    tables = {block.split("\n", 1)[0]: block for block in text.split("### ")[1:]}
    headings = ("1. Overhead", "2. Throughput", "3. Slow models", "4. Fan-out cost", "5. Sinks", "6. Horizontal")
    for heading in (*headings, "7. Cluster", "8. Streaming", "9. Streaming", "10. Tracing", "11. Seen", "12. A burst"):
        [block] = [b for title, b in tables.items() if title.startswith(heading)]
        data_rows = [line for line in block.splitlines() if line.startswith("| ")][1:]
        assert data_rows and all(any(ch.isdigit() for ch in row) for row in data_rows), block
    # Each system of the throughput scenario was measured, and each sink.
    # ... and the burst's calls made with no broker, through the SDK and through aiohttp alone.
    baselines = ("openai SDK alone, no broker", "aiohttp alone, no broker")
    for name in (
        "multillm",
        "bare pika loop",
        "celery",
        "jsonl",
        "sqlite",
        "postgresql",
        "three-node cluster",
        *baselines,
    ):
        assert f"| {name} |" in text, name
    # The slow-models rows say how late the worker's loop ran, read from its metrics.
    [slow] = [block for title, block in tables.items() if title.startswith("3. Slow models")]
    header, _, *rows = [line.strip("|").split(" | ") for line in slow.splitlines() if line.startswith("| ")]
    lag = header.index("loop lag p50 / p99 ms")
    assert rows and all(re.fullmatch(r"\d+\.\d / \d+", row[lag].strip()) for row in rows), slow
    # ... and what the worker and the host's other tenants took of the CPU meanwhile.
    for column in ("worker CPU %", "stolen %"):
        assert all(re.fullmatch(r"\d+", row[header.index(column)].strip()) for row in rows), slow
    verdicts = [line for line in text.splitlines() if line.startswith(("- met:", "- MISSED:"))]
    assert any("overhead p50" in v for v in verdicts) and any("batched SQLite" in v for v in verdicts)
    assert any("time to first token p99" in v for v in verdicts) and any("tokens/s / bare SDK" in v for v in verdicts)
    assert any("outside p99 / floor" in v for v in verdicts) and any("burst: bound / last reply" in v for v in verdicts)
    assert (tmp_path / "benchmarks.png").read_bytes().startswith(b"\x89PNG")
    # The run's scratch vhost is gone (a run killed elsewhere may have left one of its own).
    assert _bench_vhosts() <= before


def test_cpu_shares_count_this_process_within_the_machine() -> None:
    shares = CpuShares({"me": [os.getpid()]})
    spin_until = time.process_time() + 0.3
    while time.process_time() < spin_until:
        pass
    cpu = shares.stop()
    # A process spinning on its own is ~100% of a core; the machine ran at least that much.
    assert cpu["me"] >= 20, cpu  # even with the other core busy and the host stealing
    assert cpu["machine"] >= cpu["me"] - 10, cpu  # /proc's clock ticks are 10 ms each
    assert cpu["stolen"] >= 0, cpu


def test_histogram_quantile_reads_a_worker_s_histogram_as_promql_does() -> None:
    metrics = WorkerMetrics("primary")
    port = serve(metrics, 0, host="127.0.0.1")
    for _ in range(50):
        metrics.loop_lag(0.003)  # in the bucket (2.5 ms, 5 ms]
        metrics.loop_lag(0.2)  # in (100 ms, 250 ms]
    name = "multillm_event_loop_lag_seconds"
    # Linear within the bucket the rank falls in: rank 50 of 100 ends the first bucket used.
    assert histogram_quantile(port, name, 0.5) == pytest.approx(0.005)
    assert histogram_quantile(port, name, 0.99) == pytest.approx(0.1 + 0.15 * 49 / 50)
    with pytest.raises(RuntimeError, match="observed no multillm_model_call_seconds"):
        histogram_quantile(port, "multillm_model_call_seconds", 0.5)
    with pytest.raises(ValueError, match=r"quantile 1\.5 is not between 0 and 1"):
        histogram_quantile(port, name, 1.5)


def test_histogram_quantile_sums_the_series_of_a_labelled_histogram() -> None:
    registry = CollectorRegistry()
    latency = Histogram("calls_seconds", "", ["model"], buckets=(1.0, 2.0, 4.0), registry=registry)
    for _ in range(10):
        latency.labels("a").observe(0.5)  # (0, 1]
        latency.labels("b").observe(3.0)  # (2, 4]
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_port
        # As sum by (le): rank 5 of 20 is halfway through (0, 1]; rank 15 halfway through (2, 4].
        assert histogram_quantile(port, "calls_seconds", 0.25) == pytest.approx(0.5)
        assert histogram_quantile(port, "calls_seconds", 0.75) == pytest.approx(3.0)
    finally:
        server.shutdown()
        thread.join(5)


def _bench_vhosts() -> set[str]:
    return {line for line in rabbitmqctl("list_vhosts").split() if line.startswith("multillm-bench-")}

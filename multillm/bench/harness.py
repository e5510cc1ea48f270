"""What every scenario stands on: a scratch vhost, the mock in its own process, processes to measure.

Everything the benchmark measures runs as a separate process, as in production:
the mock LLM, our workers, the bare baselines, Celery. The benchmark's own
process only drives requests and reads `/proc` for the others' CPU time and memory.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from multillm import contract
from multillm.bench import ENV_BENCH_BROKER, ENV_BENCH_MOCK
from multillm.config import ENV_BROKER_URL, ENV_CONFIG, ENV_SINK_URL, StreamConfig
from multillm.mock_llm import MockControl
from multillm.producers.publishing import connect, declare_queues
from multillm.testbed.processes import ChildProcess, WorkerProcess, wait_for_consumers, write_worker_config
from multillm.testbed.rabbitmq import rabbitmqctl, scratch_vhost, vhost_of

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of `pid`, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """The most resident memory `pid` has had (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def scrape(port: int) -> tuple[str, list[Sample]]:
    """The exposition text served at `port`'s `/metrics`, and every sample in it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return text, [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def histogram_quantile(port: int, name: str, q: float) -> float:
    """The `q` quantile of histogram `name` on the worker serving metrics at `port`, all its series
    summed, as PromQL's `histogram_quantile(q, sum by (le) (...))` reckons it: linear within the
    bucket it falls in."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is not between 0 and 1")
    counts: dict[float, float] = {}
    for sample in scrape(port)[1]:
        if sample.name == f"{name}_bucket":
            bound = float(sample.labels["le"])
            counts[bound] = counts.get(bound, 0.0) + sample.value
    buckets = sorted(counts.items())
    if not buckets or buckets[-1][1] == 0:
        raise RuntimeError(f"the worker at port {port} has observed no {name}")
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # past the last finite bucket, as PromQL answers
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM, if it runs on this machine: not a node of the local cluster
    (scripts/cluster.sh names its nodes `multillm-N` in their environment)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "beam.smp" and (
                    b"RABBITMQ_NODENAME=multillm-" not in (proc / "environ").read_bytes()
                ):
                    return int(proc.name)
            except OSError:
                continue
    return None


def machine_seconds() -> tuple[float, float]:
    """CPU seconds since boot, all cores: what this machine ran, and what its host stole.

    Stolen time (`steal` in /proc/stat) is time this virtual machine had a thread ready to
    run while the hypervisor ran another tenant instead: the one cause of a slow run that
    no process here can show.
    """
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS, steal / _CLOCK_TICKS


class CpuShares:
    """Who used the CPU during a run, in % of one core: each named process, the whole machine
    (`machine`), and the host's other tenants (`stolen`, see `machine_seconds`)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self._pids = pids
        self._start = time.monotonic()
        self._machine = machine_seconds()
        self._before = {name: self._seconds(ids) for name, ids in pids.items()}

    @staticmethod
    def _seconds(pids: list[int]) -> float:
        return sum(cpu_seconds(pid) for pid in pids)

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._start
        shares = {name: (self._seconds(ids) - self._before[name]) / wall * 100 for name, ids in self._pids.items()}
        busy, stolen = machine_seconds()
        shares["machine"] = (busy - self._machine[0]) / wall * 100
        shares["stolen"] = (stolen - self._machine[1]) / wall * 100
        return shares


class Bench:
    """The broker vhost, the mock and the folder of one benchmark run; scenarios start workers in it."""

    def __init__(
        self,
        broker_url: str,
        mock_url: str,
        folder: Path,
        sink_url: str,
        mock_pid: int,
        rabbitmqctl: Callable[..., str] = rabbitmqctl,
    ) -> None:
        """`rabbitmqctl`: runs rabbitmqctl on the broker of `broker_url` (this machine's by default)."""
        self.broker_url = broker_url
        self._rabbitmqctl = rabbitmqctl
        self.mock_url = mock_url
        self.mock_pid = mock_pid
        self.mock = MockControl(mock_url)
        self.folder = folder
        self.sink_url = sink_url
        self.log_path = str(folder / "processes.log")
        config = write_worker_config(folder, broker_url=broker_url, sink_url=sink_url, mock_url=mock_url)
        # The environment overrides the file: a caller's MULTILLM_BROKER_URL must not send workers elsewhere.
        self.worker_env = {ENV_CONFIG: str(config), ENV_BROKER_URL: broker_url, ENV_SINK_URL: sink_url}

    def set_latency(self, latency_ms: float) -> None:
        self.mock.set_fault("*", latency_ms=latency_ms)

    def declare(self, models: Sequence[str]) -> None:
        """Our topology, with a queue for every model so that fan-out copies are routed (and kept)."""
        with connect(self.broker_url) as connection:
            declare_queues(
                connection,
                contract.requests_queue(),
                contract.triage_queue(),
                contract.dead_queue(),
                *(contract.model_queue_spec(m) for m in models),
            )

    def purge(self) -> None:
        """Empty every queue of the vhost between scenarios (copies nobody consumes pile up)."""
        # One rabbitmqctl to list them (each costs half a second of CPU), the purges over AMQP.
        # Exclusive queues are live callers' reply queues: another connection's, and empty between scenarios.
        listing = self._rabbitmqctl(
            "list_queues", "-p", vhost_of(self.broker_url), "name", "exclusive", "--no-table-headers"
        )
        names = [
            name
            for name, _, exclusive in (line.rpartition("\t") for line in listing.splitlines())
            if exclusive == "false"
        ]
        with connect(self.broker_url) as connection:
            channel = connection.default_channel
            for name in names:
                channel.queue_purge(name)

    def config_with(self, stream: StreamConfig) -> Path:
        """The workers' configuration with `stream` as its `[stream]`, for `workers(config=...)`."""
        return write_worker_config(
            self.folder,
            broker_url=self.broker_url,
            sink_url=self.sink_url,
            mock_url=self.mock_url,
            stream=stream,
            name=f"multillm-stream-{stream.flush_ms:g}ms-{stream.flush_bytes}b.toml",
        )

    @contextmanager
    def workers(
        self,
        args: Sequence[str],
        count: int = 1,
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Iterator[list[WorkerProcess]]:
        """`count` `multillm worker ARGS` processes, consuming, stopped with SIGTERM afterwards;
        `config`: a configuration file other than the run's; `env`: more environment."""
        env = {**self.worker_env, **({ENV_CONFIG: str(config)} if config else {}), **(env or {})}
        started = [WorkerProcess(args, env=env, log_path=self.log_path) for _ in range(count)]
        try:
            queue = (
                contract.REQUEST_QUEUE
                if args[0] == "primary"
                else contract.model_queue(args[args.index("--model") + 1])
            )
            wait_for_consumers(self.broker_url, queue, count, workers=started, timeout=60)
            yield started
        finally:
            for worker in started:
                worker.stop()

    @contextmanager
    def child(self, args: Sequence[str], queue: str, consumers: int = 1) -> Iterator[ChildProcess]:
        """A baseline process, once it consumes `queue`."""
        process = ChildProcess(
            args,
            env={ENV_BENCH_BROKER: self.broker_url, ENV_BENCH_MOCK: self.mock_url},
            log_path=self.log_path,
        )
        try:
            wait_for_consumers(self.broker_url, queue, consumers, workers=[process], timeout=60)
            yield process
        finally:
            process.stop()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@contextmanager
def bench_environment(broker_url: str, sink_url: str | None = None) -> Iterator[Bench]:
    """A scratch vhost, a temporary folder (with an SQLite sink unless told) and the mock LLM."""
    with ExitStack() as stack:
        vhost_url = stack.enter_context(scratch_vhost(broker_url, "multillm-bench"))
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="multillm-bench-")))
        port = free_port()
        mock = ChildProcess(
            python_module("multillm", "mock-llm", "--port", str(port)), log_path=str(folder / "mock.log")
        )
        stack.callback(mock.stop)
        mock_url = f"http://127.0.0.1:{port}/v1"
        MockControl(mock_url).wait_ready()
        yield Bench(vhost_url, mock_url, folder, sink_url or f"sqlite:///{folder / 'records.db'}", mock.pid)

"""Starting and stopping child processes (workers, the benchmark's baselines): for the demo, the
benchmark, and tests that need real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from multillm.config import DEFAULT_CONFIG_FILE, StreamConfig
from multillm.producers.publishing import queue_counts


class ChildProcess:
    """A child process whose output goes to `log_path` (or nowhere), stopped with SIGTERM."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.command = list(command)
        self.log_path = log_path
        # Set when it was ended on purpose without a clean stop (SIGKILL, a second signal).
        self.killed = False
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - kept open while it runs
        self.process = subprocess.Popen(
            self.command, env={**os.environ, **(env or {})}, stdout=self._log, stderr=self._log
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL if it has not exited within `timeout`. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self._log, "close"):
            self._log.close()
        return self.process.returncode

    def log_text(self) -> str:
        """What the process has logged so far ("" without a log file)."""
        if not self.log_path:
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        self.killed = True
        self.process.kill()
        self.process.wait()


class WorkerProcess(ChildProcess):
    """One `multillm worker ARGS` child process; `args` are the worker's own (`primary`, ...)."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.args = list(args)
        super().__init__([sys.executable, "-m", "multillm", "--log-json", "worker", *args], env=env, log_path=log_path)


def wait_for_consumers(
    broker_url: str, queue: str, count: int, *, timeout: float = 30.0, workers: Sequence[ChildProcess] = ()
) -> None:
    """Block until `queue` has at least `count` consumers.

    Raises:
        RuntimeError: a worker exited first, or the time ran out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [w for w in workers if not w.alive()]
        if dead:
            raise RuntimeError(f"{' '.join(dead[0].command)} exited with {dead[0].process.returncode}")
        if queue_counts(broker_url, queue)[1] >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"queue {queue!r} did not get {count} consumer(s) within {timeout:g}s")


def write_worker_config(
    folder: Path,
    *,
    broker_url: str,
    sink_url: str,
    mock_url: str,
    prices: Mapping[str, tuple[float, float]] | None = None,
    stream: StreamConfig | None = None,
    name: str = DEFAULT_CONFIG_FILE,
) -> Path:
    """A `name` (`multillm.toml`) in `folder` for workers against the mock at `mock_url` (provider `mock`),
    with `prices` (model name: USD per million input and output tokens) as `[prices."..."]`, and
    `stream` as `[stream]`."""
    # TOML basic strings accept JSON's escapes, so json.dumps quotes safely.
    path = folder / name
    text = (
        f"broker_url = {json.dumps(broker_url)}\n"
        f"sink_url = {json.dumps(sink_url)}\n\n"
        f'[providers.mock]\nbase_url = {json.dumps(mock_url)}\napi_key = "unused"\n'
    )
    for model, (per_input, per_output) in (prices or {}).items():
        text += f"\n[prices.{json.dumps(model)}]\ninput_per_mtok = {per_input}\noutput_per_mtok = {per_output}\n"
    if stream is not None:
        text += f"\n[stream]\nflush_ms = {stream.flush_ms}\nflush_bytes = {stream.flush_bytes}\n"
    path.write_text(text)
    return path

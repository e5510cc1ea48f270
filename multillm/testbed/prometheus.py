"""A Prometheus server of the tests' own, and `promtool`: Debian's `prometheus` package, run as it is.

`Prometheus` starts the real server on a free loopback port with a data folder of its own and a
configuration given as a dict, and queries it through its HTTP API. Targets come from
`file_sd` files that the caller rewrites while the server runs (`set_targets`), so that a test
decides when a worker starts being scraped. `scripts/services.sh prometheus --install` installs
the package where it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from multillm.testbed.processes import ChildProcess

# One series of an instant query: its labels and its value.
Series = tuple[dict[str, str], float]


class PromQLError(RuntimeError):
    """Prometheus refused a query (a parse or evaluation error), or answered something other than a vector."""


def installed() -> bool:
    """Whether this machine has both `prometheus` and `promtool` on its PATH."""
    return shutil.which("prometheus") is not None and shutil.which("promtool") is not None


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`promtool ARGS`, its output captured; the caller judges the exit code."""
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A `prometheus` process whose data, configuration, targets and log live in `folder`.

    Args:
        folder: a folder of the caller's, kept after `stop()` (the log is useful then).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self._process: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "prometheus.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def targets_file(self, name: str) -> Path:
        """Where `set_targets(name, ...)` writes: give it to a job's `file_sd_configs`."""
        return self.folder / "targets" / f"{name}.json"

    def set_targets(self, name: str, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
        """Replace the targets of file `name` (host:port each); Prometheus notices the file change
        and scrapes them within seconds (its discovery passes changes on at most every 5 s)."""
        path = self.targets_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        groups = [{"targets": list(targets), "labels": dict(labels or {})}] if targets else []
        # Renamed into place, so that Prometheus never reads half a file.
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(groups))
        os.replace(partial, path)

    def start(self, config: Mapping[str, Any], timeout: float = 60.0) -> None:
        """Start it on `config` and wait until it is ready; another port is tried if the one picked
        was taken meanwhile.

        Args:
            config: the contents of `prometheus.yml` as a dict (written as JSON, which YAML reads);
                point a job's `file_sd_configs` at `targets_file(NAME)` to give it targets later.

        Raises:
            RuntimeError: it exited or did not get ready in time (its log says why).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))
        for _ in range(3):
            self.port = _free_port()
            self._process = ChildProcess(
                [
                    "prometheus",
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                log_path=str(self.log_path),
            )
            if self._wait_ready(timeout):
                return
        raise RuntimeError(f"prometheus did not start; its log:\n{self.log_text()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._process.alive():
                self._process.stop()  # closes its log
                return False  # most likely the port: the caller tries another
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        return True
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.1)
        self._process.stop()
        raise RuntimeError(f"prometheus was not ready within {timeout:g}s; its log:\n{self.log_text()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM and wait; returns its exit code (0 when it was never started)."""
        return self._process.stop() if self._process is not None else 0

    # --- the HTTP API -----------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """`GET /api/v1/PATH?PARAMS`'s `data`.

        Raises:
            PromQLError: the answer's status is not `success` (Prometheus says why).
        """
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 and 422 carry the error in the body
            body = json.load(exc)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        """The instant query `expr` evaluated now, or at the Unix time `at`: one (labels, value) per series.

        Raises:
            PromQLError: Prometheus refused it, or its result is not a vector or a scalar.
        """
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PromQLError(f"{expr!r} gave a {data['resultType']}, not a vector")
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]


__all__ = ["PromQLError", "Prometheus", "Series", "installed", "promtool"]

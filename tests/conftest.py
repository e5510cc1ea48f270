"""Fixtures: a RabbitMQ vhost per test, a mock LLM over real HTTP, worker processes.

Every test that touches the broker gets a vhost of its own (created through the management
API, or with rabbitmqctl without it; deleted afterwards), so tests never see each other's queues.
Workers are real child processes (`python -m multillm worker ...`), stopped
with SIGTERM at the end of the test; a worker that does not exit 0 fails it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from psycopg import sql

from multillm import contract
from multillm.config import ENV_BROKER_URL, ENV_CONFIG
from multillm.mock_llm import MockControl, MockLLM
from multillm.producers import Client
from multillm.schemas import LLMLogRecord
from multillm.sinks import Sink, open_sink
from multillm.testbed.processes import WorkerProcess, wait_for_consumers
from multillm.testbed.rabbitmq import scratch_vhost

pytest_plugins = ["tests.cluster_fixtures"]

API_KEY_IN_CONFIG = "sk-config-0123456789abcdef"


@pytest.fixture
def broker_url() -> Iterator[str]:
    """An AMQP URL on a fresh vhost of this test's own."""
    with scratch_vhost("amqp://guest:guest@127.0.0.1:5672/%2F", "multillm-test") as url:
        yield url


@pytest.fixture(scope="module")
def mock_llm() -> Iterator[MockLLM]:
    """The mock LLM over real HTTP, shared by a module's tests; `mock_control` resets it per test."""
    with MockLLM(latency_ms=5) as mock:
        yield mock


@pytest.fixture
def mock_control(mock_llm: MockLLM) -> Iterator[MockControl]:
    control = mock_llm.control
    control.clear_faults()
    control.clear_calls()
    yield control
    control.clear_faults()


ADMIN_URL = os.environ.get("MULTILLM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test run's own; yields its URL and drops it afterwards."""
    name = f"multillm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{ADMIN_URL.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def empty_sink_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL of an empty sink of `kind` (jsonl, sqlite or postgres)."""
    if kind == "jsonl":
        return f"jsonl:///{tmp_path}/logs/records.jsonl"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/logs/records.db"
    url: str = request.getfixturevalue("pg_database")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {contract.LOG_TABLE}, {contract.SCORE_TABLE}")
    return url


@pytest.fixture
def sink_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite unless a test parametrizes it (`indirect=True`) with jsonl or postgres."""
    return empty_sink_url(getattr(request, "param", "sqlite"), tmp_path, request)


@pytest.fixture
def sink(sink_url: str) -> Iterator[Sink]:
    opened = open_sink(sink_url)
    yield opened
    opened.close()


@pytest.fixture
def make_sink(sink_url: str) -> Iterator[Callable[[], Sink]]:
    """Opens sinks on `sink_url` and closes them at the end of the test."""
    opened: list[Sink] = []

    def make() -> Sink:
        opened.append(open_sink(sink_url))
        return opened[-1]

    yield make
    for sink in opened:
        sink.close()


@pytest.fixture
def config_path(tmp_path: Path, mock_llm: MockLLM, broker_url: str, sink_url: str) -> Path:
    """The workers' multillm.toml: the mock as provider `mock`, a short retry budget."""
    path = tmp_path / "multillm.toml"
    path.write_text(
        f'broker_url = "{broker_url}"\n'
        f'sink_url = "{sink_url}"\n'
        "shutdown_grace_seconds = 10\n"
        "[retry]\nmax_attempts = 4\ninitial_wait = 0.01\nmax_wait = 0.05\nbudget_seconds = 5\n"
        f'[providers.mock]\nbase_url = "{mock_llm.url}"\napi_key = "{API_KEY_IN_CONFIG}"\ntimeout = 5\n'
    )
    return path


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(config_path: Path, broker_url: str, tmp_path: Path) -> Iterator[StartWorker]:
    """start_worker("primary"), start_worker("model", model="mock/b") or start_worker("judge", model="mock/j"):
    started and consuming."""
    started: list[WorkerProcess] = []

    def start(
        kind: str,
        *,
        model: str | None = None,
        concurrency: int = 4,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> WorkerProcess:
        args = [kind, "--concurrency", str(concurrency), *extra_args]
        if model:
            args += ["--model", model]
        env = {ENV_CONFIG: str(config_path), ENV_BROKER_URL: broker_url, **(env or {})}
        worker = WorkerProcess(args, env=env, log_path=str(tmp_path / f"worker-{len(started)}.log"))
        started.append(worker)
        fixed = {"primary": contract.REQUEST_QUEUE, "judge": contract.JUDGE_QUEUE}
        queue = fixed.get(kind) or contract.model_queue(model or "")
        same_queue = sum(
            1 for w in started if w.alive() and w.args[:1] == [kind] and (model is None or model in w.args)
        )
        wait_for_consumers(broker_url, queue, same_queue, workers=[worker])
        return worker

    yield start
    unclean = [(w.args, code) for w in started if (code := w.stop()) != 0 and not w.killed]
    assert not unclean, f"workers did not exit 0 on SIGTERM: {unclean}"


@pytest.fixture
def raw_channel(broker_url: str) -> Iterator[Any]:
    """A raw pika channel with publisher confirms on the test's vhost: another producer, written
    against the contract only."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    opened = connection.channel()
    opened.confirm_delivery()
    yield opened
    connection.close()


@pytest.fixture
def client(broker_url: str) -> Iterator[Client]:
    with Client(broker_url, timeout=30) as opened:
        yield opened


def wait_for_log(worker: WorkerProcess, text: str, timeout: float = 20.0) -> None:
    """Block until `text` appears in the worker's log."""
    import time

    deadline = time.monotonic() + timeout
    while text not in worker.log_text():
        assert time.monotonic() < deadline, f"{text!r} never appeared in the worker's log"
        time.sleep(0.05)


def wait_for_records(sink: Sink, request_id: str, count: int, timeout: float = 15.0) -> list[LLMLogRecord]:
    """The records of one request, once there are `count` of them (per-model workers finish later)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = sink.records(request_id)
        if len(records) >= count or time.monotonic() > deadline:
            return sorted(records, key=lambda r: r.model_index)
        time.sleep(0.05)

"""`--metrics-port`: real workers, real broker, real mock LLM, metrics scraped over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from multillm.bench.harness import scrape as scrape_metrics
from multillm.config import ENV_BROKER_URL, ENV_CONFIG
from multillm.errors import InvalidArgument, Unavailable
from multillm.metrics import MAX_SERIES, WorkerMetrics
from multillm.mock_llm import MockControl
from multillm.producers import Client, make_request
from multillm.schemas import V1Model
from multillm.sinks import Sink
from multillm.testbed.processes import WorkerProcess
from tests.conftest import API_KEY_IN_CONFIG, StartWorker, wait_for_log, wait_for_records

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_port(worker: WorkerProcess) -> int:
    """The port a worker started with `--metrics-port 0` chose, from its `metrics.serving` log line."""
    wait_for_log(worker, "metrics.serving")
    for line in worker.log_text().splitlines():
        if "metrics.serving" in line:
            return int(json.loads(line)["port"])
    raise AssertionError("no metrics.serving line")


def scrape(port: int) -> tuple[str, Samples]:
    text, samples = scrape_metrics(port)
    return text, {(sample.name, frozenset(sample.labels.items())): sample.value for sample in samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels; 0 when it was never counted."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(port: int, check: Callable[[Samples], bool], timeout: float = 20.0) -> Samples:
    """Scrape until `check` holds: replies are counted when their confirm arrives, which may be after the client
    already has the reply."""
    deadline = time.monotonic() + timeout
    while True:
        _, samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_workers_count_what_they_did(
    start_worker: StartWorker, client: Client, sink: Sink, mock_control: MockControl
) -> None:
    primary = start_worker("primary", extra_args=["--metrics-port", "0"])
    beta = start_worker("model", model="mock/beta", extra_args=["--metrics-port", "0"])
    primary_port, beta_port = metrics_port(primary), metrics_port(beta)
    assert primary_port != beta_port
    mock_control.set_fault("flaky", statuses=[503])  # one 503, then answers
    mock_control.set_fault("broken", always=500)  # fails every try: 4 tries in tests' config

    alpha_with_key = V1Model(name="mock/alpha", api_key="sk-request-secret-42")
    fanned = client.submit(make_request([alpha_with_key, "mock/beta"], "hi"))
    fanned.result(timeout=30)
    client.create(make_request(["mock/flaky"], "hello"), timeout=30)
    with pytest.raises(Unavailable):
        client.create(make_request(["mock/broken"], "hello"), timeout=30)
    client.create(make_request(["mock/alpha", "mock/nowhere"], "no queue for the second"), timeout=30)
    with pytest.raises(InvalidArgument):
        client.create(make_request(["nosuch/model"], "unknown provider"), timeout=30)
    wait_for_records(sink, fanned.request_id, 2)

    kind = {"kind": "primary"}
    dead_labels = {**kind, "queue": "multillm.requests", "code": "INVALID_ARGUMENT"}
    # The unknown provider's dead letter is the last thing the primary publishes.
    samples = eventually(primary_port, lambda s: value(s, "multillm_dead_letters_total", **dead_labels) >= 1)
    assert value(samples, "multillm_messages_consumed_total", **kind, queue="multillm.requests") == 5
    assert value(samples, "multillm_redeliveries_total", **kind, queue="multillm.requests") == 0
    assert value(samples, "multillm_replies_sent_total", **kind, outcome="ok", code="OK") == 3
    assert value(samples, "multillm_replies_sent_total", **kind, outcome="error", code="UNAVAILABLE") == 1
    assert value(samples, "multillm_replies_sent_total", **kind, outcome="error", code="INVALID_ARGUMENT") == 1
    assert value(samples, "multillm_errors_total", **kind, model="mock/broken", code="UNAVAILABLE") == 1
    # The copy no queue took becomes an error record of its own.
    assert value(samples, "multillm_errors_total", **kind, model="mock/nowhere", code="UNAVAILABLE") == 1
    assert value(samples, "multillm_retries_total", **kind, model="mock/flaky", reason="503") == 1
    assert value(samples, "multillm_retries_total", **kind, model="mock/broken", reason="500") == 3
    assert value(samples, "multillm_model_call_seconds_count", **kind, model="mock/alpha") == 2
    assert value(samples, "multillm_model_call_seconds_count", **kind, model="mock/flaky") == 1
    assert value(samples, "multillm_model_call_seconds_count", **kind, model="mock/broken") == 1
    assert value(samples, "multillm_model_call_seconds_bucket", **kind, model="mock/alpha", le="+Inf") == 2
    assert value(samples, "multillm_model_calls_in_flight", **kind, model="mock/alpha") == 0
    assert value(samples, "multillm_fanout_copies_total", **kind, model="mock/beta", result="published") == 1
    assert value(samples, "multillm_fanout_copies_total", **kind, model="mock/nowhere", result="unroutable") == 1
    dead = value(samples, "multillm_dead_letters_total", **kind, queue="multillm.requests", code="INVALID_ARGUMENT")
    assert dead == 1
    # alpha twice, flaky, broken, and the error record of mock/nowhere.
    assert value(samples, "multillm_sink_write_seconds_count", **kind) == 5
    assert value(samples, "multillm_sink_write_failures_total", **kind) == 0
    # The loop's timer ticks every quarter second from the start.
    samples = eventually(primary_port, lambda s: value(s, "multillm_event_loop_lag_seconds_count", **kind) >= 2)
    assert value(samples, "multillm_event_loop_lag_seconds_count", **kind) >= 2
    assert value(samples, "multillm_event_loop_lag_seconds_bucket", **kind, le="+Inf") >= 2

    kind = {"kind": "model"}
    samples = eventually(beta_port, lambda s: value(s, "multillm_sink_write_seconds_count", **kind) >= 1)
    assert value(samples, "multillm_messages_consumed_total", **kind, queue="multillm.model.mock/beta") == 1
    assert value(samples, "multillm_model_call_seconds_count", **kind, model="mock/beta") == 1
    assert value(samples, "multillm_sink_write_seconds_count", **kind) == 1
    assert value(samples, "multillm_replies_sent_total", **kind, outcome="ok", code="OK") == 0

    for port in (primary_port, beta_port):
        text, _ = scrape(port)
        assert "sk-request-secret-42" not in text and API_KEY_IN_CONFIG not in text
        assert "process_cpu_seconds_total" in text


def test_a_busy_metrics_port_is_a_clear_error(config_path: Path, broker_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "multillm", "worker", "primary", "--metrics-port", str(port)],
            env={**os.environ, ENV_CONFIG: str(config_path), ENV_BROKER_URL: broker_url},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert f"metrics port {port} is already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_log_level_comes_from_the_environment(start_worker: StartWorker, client: Client) -> None:
    quiet = start_worker("primary")
    client.create(make_request(["mock/alpha"], "one"), timeout=30)
    chatty = start_worker("primary", env={"MULTILLM_LOG_LEVEL": "debug"})
    # Two consumers share the queue: send until the debug worker has served one.
    for i in range(40):
        client.create(make_request(["mock/alpha"], f"request {i}"), timeout=30)
        if "record.written" in chatty.log_text():
            break
    wait_for_log(chatty, "record.written")
    debug_lines = [json.loads(line) for line in chatty.log_text().splitlines() if '"record.written"' in line]
    assert debug_lines[0]["level"] == "debug"
    assert {"request_id", "log_id", "model"} <= debug_lines[0].keys()
    assert "record.written" not in quiet.log_text()
    # Nothing is served without --metrics-port.
    assert "metrics.serving" not in quiet.log_text() + chatty.log_text()


def test_a_bad_log_level_in_the_environment_names_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "multillm", "logs", "list"],
        env={**os.environ, "MULTILLM_LOG_LEVEL": "chatty"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "MULTILLM_LOG_LEVEL='chatty'" in done.stderr


def test_label_values_are_bounded() -> None:
    metrics = WorkerMetrics("model")
    for i in range(MAX_SERIES + 5):
        metrics.retried(f"mock/m{i}", "503")
    families = {f.name: f for f in text_string_to_metric_families(_exposition(metrics))}
    totals = [s for s in families["multillm_retries"].samples if s.name == "multillm_retries_total"]
    assert len(totals) == MAX_SERIES + 1
    other = [s for s in totals if s.labels["model"] == "other"]
    assert other[0].labels["reason"] == "other" and other[0].value == 5


def _exposition(metrics: WorkerMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()

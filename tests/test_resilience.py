"""Faults issue 2 promises to survive: cut connections, slow models, SIGTERM mid-call."""

from __future__ import annotations

import signal
import time

from multillm import contract
from multillm.config import ENV_BROKER_URL
from multillm.mock_llm import MockControl
from multillm.producers import Client, make_request
from multillm.producers.publishing import queue_counts
from multillm.sinks import Sink
from multillm.testbed.rabbitmq import rabbitmqctl, vhost_of
from tests.conftest import StartWorker, wait_for_log, wait_for_records


def test_client_and_worker_reconnect_after_the_broker_cuts_every_connection(
    start_worker: StartWorker, client: Client, broker_url: str
) -> None:
    worker = start_worker("primary")
    assert client.create(make_request(["mock/echo"], "before the cut")).text

    rabbitmqctl("close_all_connections", "-p", vhost_of(broker_url), "test cut")
    wait_for_log(worker, "broker.connection_lost")

    assert client.create(make_request(["mock/echo"], "after the cut"), timeout=30).text == "echo says: after the cut"
    assert worker.alive()


def test_a_slow_model_call_does_not_starve_heartbeats(
    start_worker: StartWorker, client: Client, broker_url: str, mock_control: MockControl
) -> None:
    # With a 1 s heartbeat the broker drops a connection whose thread is blocked for ~3 s;
    # the model call below takes 4 s, so this passes only if the call never blocks the event loop
    # that runs pika's connection (heartbeats included).
    worker = start_worker("primary", env={ENV_BROKER_URL: broker_url + "?heartbeat=1"})
    mock_control.set_fault("slow", latency_ms=4000)

    assert client.create(make_request(["mock/slow"], "take your time"), timeout=30).text
    assert "broker.connection_lost" not in worker.log_text()
    assert len(mock_control.calls()) == 1  # answered once, not redelivered after a dropped connection


def test_sigterm_finishes_the_call_in_flight_then_exits_zero(
    start_worker: StartWorker, client: Client, sink: Sink, mock_control: MockControl, broker_url: str
) -> None:
    worker = start_worker("primary", env={"MULTILLM_LOG_LEVEL": "debug"})  # request.accepted is a debug line
    mock_control.set_fault("slow", latency_ms=1500)
    future = client.submit(make_request(["mock/slow"], "finish me"))
    wait_for_log(worker, "request.accepted")

    worker.process.send_signal(signal.SIGTERM)
    reply = future.result(timeout=30)

    assert reply.text == "slow says: finish me"
    assert worker.process.wait(timeout=30) == 0
    assert [r.status for r in wait_for_records(sink, future.request_id, 1)] == ["ok"]
    assert queue_counts(broker_url, contract.REQUEST_QUEUE)[0] == 0  # acked, not put back for a second call
    assert len(mock_control.calls()) == 1


def test_sigterm_puts_prefetched_requests_back_at_once(
    start_worker: StartWorker, client: Client, mock_control: MockControl, broker_url: str
) -> None:
    # One call slot, prefetch two: the second request waits in the worker, not in the queue.
    worker = start_worker("primary", concurrency=1, env={"MULTILLM_LOG_LEVEL": "debug"})
    mock_control.set_fault("slow", latency_ms=4000)
    first = client.submit(make_request(["mock/slow"], "in flight"))
    wait_for_log(worker, "request.accepted")
    second = client.submit(make_request(["mock/slow"], "waiting"))
    deadline = time.monotonic() + 10
    while queue_counts(broker_url, contract.REQUEST_QUEUE)[0] and time.monotonic() < deadline:
        time.sleep(0.05)  # until the worker has prefetched it

    worker.process.send_signal(signal.SIGTERM)
    # Back in the queue while the first call still runs, not after it (4 s).
    back = time.monotonic() + 2.5
    while queue_counts(broker_url, contract.REQUEST_QUEUE)[0] == 0 and time.monotonic() < back:
        time.sleep(0.05)
    assert queue_counts(broker_url, contract.REQUEST_QUEUE)[0] == 1
    assert not first.done()

    assert first.result(timeout=30).text == "slow says: in flight"
    assert worker.process.wait(timeout=30) == 0
    start_worker("primary")
    assert second.result(timeout=30).text == "slow says: waiting"
    assert [c.prompt for c in mock_control.calls()] == ["in flight", "waiting"]  # each called once

"""On a real three-node RabbitMQ cluster (scripts/cluster.sh): a node dies, nothing is lost, nobody hangs.

Each test kills one node with SIGKILL (its peers get no goodbye, as when a machine dies) and
keeps it down while it checks what the issue asks; the `cluster_url` fixture starts it again
before the next test. Workers and callers are given the nodes in an order that puts them
where the test needs them (`broker_failover = "round-robin"`: the first node listed first).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pika
import pytest

from multillm import contract
from multillm.config import ENV_BROKER_URL, ENV_CONFIG
from multillm.errors import RequestTimeout
from multillm.metrics import Published
from multillm.mock_llm import MockControl, MockLLM
from multillm.producers import AsyncClient, Client, PendingReply, Reply, ReplyQueue, make_request
from multillm.schemas import V1MultiLLMChatCompletion
from multillm.sinks import open_sink
from multillm.testbed.cluster import LocalCluster
from multillm.testbed.processes import WorkerProcess, wait_for_consumers
from multillm.testbed.rabbitmq import vhost_of
from multillm.workers.amqp_session import AmqpSession
from multillm.workers.confirms import PipelinedConfirms
from multillm.workers.messages import Outgoing
from tests.test_cli import multillm

# The local cluster is one per run and its nodes have fixed ports: never two of its tests at once.
pytestmark = pytest.mark.serial


PRIMARY, OTHER = "mock/echo", "mock/upper"


def rotated(cluster_url: str, first: int) -> str:
    """The same node list, starting at node `first` (0-based)."""
    nodes = cluster_url.split(";")
    return ";".join(nodes[first:] + nodes[:first])


class Fleet:
    """Worker processes on the cluster, all given `broker_url` in the order it lists."""

    def __init__(self, folder: Path, cluster_url: str, mock: MockLLM) -> None:
        self.cluster_url = self.broker_url = cluster_url
        self.sink_url = f"sqlite:///{folder}/records.db"
        self.config = folder / "multillm.toml"
        self.config.write_text(
            f'broker_url = "{cluster_url}"\nbroker_failover = "round-robin"\nsink_url = "{self.sink_url}"\n'
            "shutdown_grace_seconds = 10\n"
            "[retry]\nmax_attempts = 4\ninitial_wait = 0.01\nmax_wait = 0.05\nbudget_seconds = 20\n"
            f'[providers.mock]\nbase_url = "{mock.url}"\napi_key = "unused"\ntimeout = 30\n'
        )
        self.folder = folder
        self.workers: list[WorkerProcess] = []

    def start(self, primaries: int, others: int, *, first_node: int = 0, concurrency: int = 4) -> None:
        """Workers given the nodes from `first_node` on."""
        self.broker_url = rotated(self.cluster_url, first_node)
        env = {ENV_CONFIG: str(self.config), ENV_BROKER_URL: self.broker_url}
        for _ in range(primaries):
            args = ["primary", "--concurrency", str(concurrency)]
            self.workers.append(WorkerProcess(args, env=env, log_path=self._next_log()))
        for _ in range(others):
            args = ["model", "--model", OTHER, "--concurrency", str(concurrency)]
            self.workers.append(WorkerProcess(args, env=env, log_path=self._next_log()))
        wait_for_consumers(self.broker_url, contract.REQUEST_QUEUE, primaries, workers=self.workers, timeout=60)
        wait_for_consumers(self.broker_url, contract.model_queue(OTHER), others, workers=self.workers, timeout=60)

    def _next_log(self) -> str:
        # One file each: a worker's buffered output, shared, would interleave mid-line with another's.
        return str(self.folder / f"worker-{len(self.workers)}.log")

    def log_lines(self, event: str) -> list[dict[str, object]]:
        lines = [line for worker in self.workers for line in worker.log_text().splitlines()]
        return [entry for line in lines if line.startswith("{") and (entry := json.loads(line))["event"] == event]

    def stop(self) -> list[int]:
        return [worker.stop() for worker in self.workers]


@pytest.fixture
def fleet(tmp_path: Path, cluster_url: str, mock_llm: MockLLM) -> Iterator[Fleet]:
    """Workers given the nodes from the first on; each must exit 0 on SIGTERM at the end."""
    started = Fleet(tmp_path, cluster_url, mock_llm)
    yield started
    codes = started.stop()
    assert codes == [0] * len(codes), f"workers did not exit 0 on SIGTERM: {codes}"


# Connection states in which a connection carries traffic; the others are opening or closing.
LIVE_STATES = frozenset({"running", "flow", "blocking", "blocked"})


def worker_ports(cluster: LocalCluster, cluster_url: str, workers: Sequence[WorkerProcess]) -> dict[int, list[int]]:
    """The AMQP ports of each worker's live connections in the test's vhost, by worker pid, as the
    broker lists them (the workers name their connections after their pid). A connection of no
    worker fails the test, with the broker's listing; one still opening or closing (a worker
    that gave up a connect and tried again) is printed, not counted."""
    columns = ["-p", vhost_of(cluster_url), "name", "port", "state", "connected_at"]
    arguments = [*columns, "client_properties", "--formatter", "json"]
    listed = json.loads(cluster.rabbitmqctl(cluster.names[1], "list_connections", *arguments))
    ports: dict[int, list[int]] = {worker.pid: [] for worker in workers}
    for row in listed:
        if "Pika" not in json.dumps(row["client_properties"]):
            continue  # kombu's (py-amqp) connections: the test's callers
        pid = re.search(r"multillm worker pid (\d+): ", json.dumps(row["client_properties"]))
        assert pid and int(pid[1]) in ports, f"a pika connection of no worker: {row}\n{listed}"
        if row["state"] in LIVE_STATES:
            ports[int(pid[1])].append(row["port"])
        else:
            print(f"worker pid {pid[1]}: a connection {row['state']} on port {row['port']} ({row['name']})")
    return {pid: sorted(found) for pid, found in ports.items()}


def test_the_node_that_leads_the_requests_dies_under_load(
    rabbit_cluster: LocalCluster, cluster_url: str, fleet: Fleet, mock_control: MockControl
) -> None:
    """300 requests to two models; the node that leads `multillm.requests` and holds every worker's
    connection is SIGKILLed a third of the way in and kept down."""
    doomed, doomed_port = rabbit_cluster.names[0], rabbit_cluster.ports[0]
    mock_control.set_fault("*", latency_ms=20)
    fleet.start(primaries=2, others=2)
    # The workers list the doomed node first: they connect there, and the first to declare the
    # request queue made it lead it (RabbitMQ places a new queue's leader on the declaring node).
    assert rabbit_cluster.leader_of(contract.REQUEST_QUEUE, vhost_of(cluster_url)).startswith(doomed)
    ports = worker_ports(rabbit_cluster, cluster_url, fleet.workers)
    retried = fleet.log_lines("broker.node_unreachable") + fleet.log_lines("broker.connection_lost")
    assert ports == {w.pid: [doomed_port] for w in fleet.workers}, retried

    total = 300
    answered_at: dict[int, float] = {}
    killed_at: list[float] = []
    # The caller starts on the second node: its own node's death is the next test's.
    with Client(rotated(cluster_url, 1), timeout=90) as client:
        futures: list[Future[V1MultiLLMChatCompletion]] = []
        for i in range(total):
            future = client.submit(make_request([PRIMARY, OTHER], f"load {i}"), timeout=90)
            future.add_done_callback(lambda _, i=i: answered_at.setdefault(i, time.monotonic()))
            futures.append(future)
            if i == total // 3:
                rabbit_cluster.kill(doomed)
                killed_at.append(time.monotonic())
            time.sleep(0.01)
        texts = [client.wait(future, timeout=90).text for future in futures]
    assert texts == [f"echo says: load {i}" for i in range(total)]

    # `multillm request` while the node is down, given the dead node first.
    done = multillm(
        "request", "--model", PRIMARY, "--model", OTHER, "--json", "while a node is down",
        env={ENV_CONFIG: str(fleet.config), ENV_BROKER_URL: cluster_url}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(done.stdout)["completion"]["choices"][0]["message"]["content"] == "echo says: while a node is down"
    )

    # Exactly one record per model per request, each with the model's answer.
    records = _records_when_complete(fleet.sink_url, expected=2 * (total + 1))
    by_request: dict[str, dict[str, str]] = {}
    for record in records:
        assert record.status == "ok", (record.model_name, record.error_code, record.error_message)
        models = by_request.setdefault(str(record.messages[-1].content), {})
        assert record.model_name not in models, f"two records of {record.model_name} for one request"
        models[record.model_name] = str(record.output[0].message.content) if record.output else ""
    for i in range(total):
        assert by_request[f"load {i}"] == {PRIMARY: f"echo says: load {i}", OTHER: f"upper says: LOAD {i}"}

    # No worker exited; each moved to a node that lives, and says so.
    assert all(worker.alive() for worker in fleet.workers)
    ports = worker_ports(rabbit_cluster, cluster_url, fleet.workers)
    assert all(len(found) == 1 and doomed_port not in found for found in ports.values()), ports
    moved = [e for e in fleet.log_lines("worker.consuming") if e["node"] != f"127.0.0.1:{doomed_port}"]
    assert len(moved) >= 4, moved
    gap = _longest_gap(sorted(answered_at.values()), after=killed_at[0])
    calls = Counter((call.model, call.prompt) for call in mock_control.calls())
    print(
        f"\nlongest pause between replies after the kill: {gap:.2f} s;"
        f" model calls repeated by redelivery: {sum(n - 1 for n in calls.values())}"
    )

    # The node comes back: the cluster is whole, and serves through it.
    rabbit_cluster.restart(doomed)
    assert rabbit_cluster.running_nodes() == sorted(rabbit_cluster.names)
    with Client(rabbit_cluster.node_urls(vhost_of(cluster_url))[0], timeout=60) as through_it:
        assert through_it.create(make_request([PRIMARY, OTHER], "whole again")).text == "echo says: whole again"
    online = rabbit_cluster.queue_info(contract.REQUEST_QUEUE, vhost_of(cluster_url), ("online",))["online"]
    assert sorted(online) == sorted(rabbit_cluster.names)


def _records_when_complete(sink_url: str, expected: int, patience: float = 60.0) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + patience
    sink = open_sink(sink_url)
    try:
        while True:
            records = sink.records()
            if len(records) >= expected or time.monotonic() > deadline:
                assert len(records) == expected, f"{len(records)} records, {expected} expected"
                return records
            time.sleep(0.2)
    finally:
        sink.close()


def _longest_gap(times: Sequence[float], after: float) -> float:
    later = [t for t in times if t >= after]
    return max((b - a for a, b in zip([after, *later], later, strict=False)), default=0.0)


def test_callers_whose_node_dies_mid_call_get_their_replies(
    rabbit_cluster: LocalCluster, cluster_url: str, fleet: Fleet, mock_control: MockControl
) -> None:
    """Calls in flight (10 s model) when the callers' node dies: a Client, an AsyncClient and a named ReplyQueue
    given the cluster get every reply; a Client given that node alone gets RequestTimeout on time."""
    doomed = rabbit_cluster.names[0]
    vhost_name = vhost_of(cluster_url)
    # The worker on the second node, with a call slot for every call; the callers start on the first.
    calls = 4
    fleet.start(primaries=1, others=0, first_node=1, concurrency=4 * calls)
    mock_control.set_fault("*", latency_ms=10000)
    callers_url = cluster_url

    client = Client(callers_url, timeout=45)
    lone = Client(rabbit_cluster.node_urls(vhost_name)[0], timeout=8)
    replies_name = "cluster-test.replies"
    named: list[Reply] = []
    reading = threading.Thread(
        target=lambda: named.extend(_read_replies(callers_url, replies_name, calls)), daemon=True
    )
    try:
        pending = [client.submit(make_request([PRIMARY], f"sync {i}")) for i in range(calls)]
        lone_pending = [lone.submit(make_request([PRIMARY], f"lone {i}")) for i in range(calls)]
        published = [client.publish(make_request([PRIMARY], f"named {i}"), reply_to=replies_name) for i in range(calls)]
        reading.start()

        async def async_calls() -> list[str]:
            async with AsyncClient(callers_url, timeout=45) as async_client:
                tasks = [
                    asyncio.ensure_future(async_client.create(make_request([PRIMARY], f"async {i}")))
                    for i in range(calls)
                ]
                await asyncio.to_thread(_wait_until_taken, rabbit_cluster, vhost_name, 4 * calls)
                started = time.monotonic()
                await asyncio.to_thread(rabbit_cluster.kill, doomed)
                # Every call still in flight (the lone client's replies must not be in before the kill).
                assert not any(future.done() for future in (*pending, *lone_pending, *tasks))
                texts = [reply.text for reply in await asyncio.gather(*tasks)]
                print(f"\nasync calls answered {time.monotonic() - started:.1f} s after the kill")
                return texts

        assert asyncio.run(async_calls()) == [f"echo says: async {i}" for i in range(calls)]
        assert [client.wait(f).text for f in pending] == [f"echo says: sync {i}" for i in range(calls)]
        reading.join(timeout=45)
        assert not reading.is_alive()
        assert {reply.request_id: reply.result().text for reply in named} == {
            request_id: f"echo says: named {i}" for i, request_id in enumerate(published)
        }
        # The lone client's reply queue (classic, one node) went down with its node: a clear error, in time.
        began = time.monotonic()
        with ThreadPoolExecutor(calls) as waiting:
            outcomes = list(waiting.map(lambda future: _outcome(lone, future), lone_pending))
        assert outcomes == ["RequestTimeout: no reply within 8s"] * calls
        assert time.monotonic() - began <= 9
        # The cluster callers go on working with the node still down.
        mock_control.clear_faults()
        assert client.create(make_request([PRIMARY], "after")).text == "echo says: after"
    finally:
        client.close()
        lone.close()


def _outcome(client: Client, future: PendingReply) -> str:
    try:
        return client.wait(future).text
    except RequestTimeout as exc:
        return f"RequestTimeout: {str(exc).replace(f' to request {future.request_id}', '')}"


def _wait_until_taken(cluster: LocalCluster, vhost: str, count: int, timeout: float = 60.0) -> None:
    """Until `count` requests are in the worker's hands (it has a call slot for each): all published,
    none waiting in the queue."""
    deadline = time.monotonic() + timeout
    keys = ("messages_ready", "messages_unacknowledged")
    while (info := cluster.queue_info(contract.REQUEST_QUEUE, vhost, keys)) != dict(
        name=contract.REQUEST_QUEUE, messages_ready=0, messages_unacknowledged=count
    ):
        assert time.monotonic() < deadline, f"the worker never took the {count} requests: {info}"
        time.sleep(0.2)


def _read_replies(broker_url: str, name: str, count: int) -> list[Reply]:
    replies: list[Reply] = []
    queue = ReplyQueue(broker_url, name)
    try:
        queue.consume(replies.append, limit=count, idle_timeout=40)
    finally:
        queue.close()
    return replies


def test_a_publish_refused_on_a_channel_that_met_a_dead_leader_goes_through(
    rabbit_cluster: LocalCluster, cluster_url: str
) -> None:
    """RabbitMQ 3.10 refuses, for as long as the channel lives, what a channel publishes to a quorum queue
    when its first publish there came while the queue's leader was on a node that had just died (as a
    worker's does when it reconnects after that node's death). The worker's publisher retries on a channel
    of its own, and the message is taken."""
    doomed = rabbit_cluster.names[0]
    leader_url, survivor_url = cluster_url.split(";")[:2]
    declaring = pika.BlockingConnection(pika.URLParameters(leader_url))
    declaring.channel().queue_declare("probe", durable=True, arguments=contract.requests_queue().arguments)
    assert rabbit_cluster.leader_of("probe", vhost_of(cluster_url)).startswith(doomed)
    rabbit_cluster.kill(doomed)

    async def publish_once() -> tuple[list[bool], list[bool]]:
        session = await AmqpSession.open(pika.URLParameters(survivor_url))
        try:
            confirms = await PipelinedConfirms.start(session, session.lose)
            results: list[list[bool]] = []
            for attempt in range(2):
                done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
                message = Outgoing(
                    "", "probe", f"message {attempt}".encode(), pika.BasicProperties(delivery_mode=2), Published.REPLY
                )
                confirms.publish_all([message], done.set_result)
                results.append(await asyncio.wait_for(done, 30))
            return results[0], results[1]
        finally:
            await session.aclose()

    first, second = asyncio.run(publish_once())
    assert (first, second) == ([True], [True])
    reading = pika.BlockingConnection(pika.URLParameters(survivor_url)).channel()
    bodies = [reading.basic_get("probe", auto_ack=True)[2] for _ in range(2)]
    assert sorted(bodies) == [b"message 0", b"message 1"]

"""`multillm chaos`: a bounded soak under real faults, ending in a table of what was lost.

In a RabbitMQ vhost of its own it runs primary and per-model workers against the
mock LLM, sends requests at a steady pace, and meanwhile SIGKILLs and SIGTERMs
random workers (restarting them), cuts every broker connection of the vhost, and
makes the mock fail at random (429, 5xx, dropped connections). With `cluster`, it
runs on the local three-node cluster (scripts/cluster.sh) instead, and also SIGKILLs
a random broker node now and then, keeps it down a few seconds and starts it again.
Then it stops the faults, waits for the stragglers, and counts: every confirmed request must have a
reply, every model of every request a record that carries the mock's answer; model
calls and duplicate record writes are counted where they happen (chaos_figures).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import kombu

from multillm import contract
from multillm.config import DEFAULT_CONFIG_FILE, ENV_BROKER_URL, ENV_CONFIG, ENV_LOG_LEVEL, Settings
from multillm.errors import ConfigError, MultiLLMError
from multillm.mock_llm import MAX_LOGGED_CALLS, MockCall, MockLLM
from multillm.producers import Client, Reply, ReplyQueue, make_request
from multillm.producers.publishing import connect, queue_counts
from multillm.progress import progress
from multillm.schemas import LLMLogRecord
from multillm.sinks import open_sink
from multillm.testbed.chaos_figures import (
    ChaosReport,
    count_calls,
    count_records,
    disagreements,
    records_without_their_answer,
    refused_writes,
)
from multillm.testbed.cluster import LocalCluster
from multillm.testbed.processes import WorkerProcess, wait_for_consumers
from multillm.testbed.rabbitmq import rabbitmqctl, scratch_vhost, vhost_of

MODELS = ("mock/alpha", "mock/beta", "mock/gamma")
REPLIES = "chaos.replies"
# Random failures of the mock: each try fails with this probability, so with three
# tries about one model call in a hundred fails for good (and is recorded as such).
MOCK_ERROR_RATE = 0.2


@dataclass
class _Replies:
    """Counts replies by correlation id, from the collector thread."""

    seen: Counter[str] = field(default_factory=Counter)
    first: dict[str, Reply] = field(default_factory=dict)
    codes: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, reply: Reply) -> None:
        request_id = reply.request_id or ""
        with self.lock:
            self.seen[request_id] += 1
            if self.seen[request_id] == 1:
                self.first[request_id] = reply
                if reply.status is not None:
                    self.codes[reply.status.code] += 1


class _Fleet:
    """The worker processes; restarts whichever the chaos took down."""

    def __init__(self, env: dict[str, str], logs: Path, primaries: int, per_model: int) -> None:
        self._env, self._logs = env, logs
        self.specs = [["primary", "--concurrency", "8"]] * primaries
        for model in MODELS[1:]:
            self.specs += [["model", "--model", model, "--concurrency", "8"]] * per_model
        self.workers = [self._start(spec) for spec in self.specs]

    def _start(self, spec: list[str]) -> WorkerProcess:
        return WorkerProcess(spec, env=self._env, log_path=str(self._logs))

    def replace(self, index: int, sig: str) -> int:
        """Kill (SIGKILL) or stop (SIGTERM) one worker and start its successor; returns its exit code."""
        victim = self.workers[index]
        if sig == "KILL":
            victim.kill()
            code = 0
        else:
            code = victim.stop(timeout=30)
        self.workers[index] = self._start(self.specs[index])
        return code

    def revive_dead(self) -> int:
        """Restart the workers that exited without being asked to; returns how many."""
        dead = [i for i, w in enumerate(self.workers) if not w.alive()]
        for index in dead:
            self.workers[index] = self._start(self.specs[index])
        return len(dead)

    def stop(self) -> list[int]:
        return [w.stop(timeout=30) for w in self.workers]


def run_chaos(settings: Settings, *, requests: int, duration: float, seed: int, cluster: bool = False) -> int:
    rng = random.Random(seed)
    report = ChaosReport()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        brokers = stack.enter_context(
            _Brokers.on_local_cluster() if cluster else _Brokers.on_broker(settings.broker_url)
        )
        broker_url = brokers.broker_url
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="multillm-chaos-"))
        mock = stack.enter_context(MockLLM(latency_ms=20))
        sink_url = f"sqlite:///{tmp}/chaos.db"
        config = Path(tmp) / DEFAULT_CONFIG_FILE
        config.write_text(
            f'sink_url = "{sink_url}"\nshutdown_grace_seconds = 10\n'
            "[retry]\nmax_attempts = 3\ninitial_wait = 0.05\nmax_wait = 0.5\nbudget_seconds = 10\n"
            f'[providers.mock]\nbase_url = "{mock.url}"\napi_key = "unused"\ntimeout = 5\n'
        )
        # Info, whatever the caller's environment says: a refused write is logged at info.
        env = {ENV_CONFIG: str(config), ENV_BROKER_URL: broker_url, ENV_LOG_LEVEL: "info"}
        worker_log = Path(tmp) / "workers.log"
        fleet = _Fleet(env, worker_log, primaries=2, per_model=2)
        wait_for_consumers(broker_url, contract.REQUEST_QUEUE, 2, timeout=60)
        for model in MODELS[1:]:
            wait_for_consumers(broker_url, contract.model_queue(model), 2, timeout=60)
        print(
            f"chaos in vhost {vhost_of(broker_url)}: {len(fleet.workers)} workers,"
            f" {requests} requests over ~{duration:g}s"
        )
        prompts, replies = _soak(brokers, fleet, mock, rng, seed, requests, duration, report)
        _wait_for(
            lambda: count_records(report, _records(sink_url, prompts)),
            report.records_expected,
            patience=60,
            what="records",
        )
        report.workers_died_on_their_own += sum(1 for w in fleet.workers if not w.alive())
        report.unclean_exits += sum(1 for code in fleet.stop() if code != 0)
        # Every worker has stopped: no call, record or log line comes after this.
        records = _records(sink_url, prompts)
        calls = _every_call(mock)
        count_records(report, records)
        count_calls(report, calls, set(prompts.values()))
        report.replies_disagreeing_with_records = disagreements(records, replies)
        report.records_without_their_answer = records_without_their_answer(records, prompts, calls)
        with worker_log.open(encoding="utf-8", errors="replace") as lines:
            report.refused_record_writes = refused_writes(lines, prompts)
        report.dead_letters = queue_counts(broker_url, contract.DEAD_QUEUE)[0]
        report.dead_letter_reasons = _dead_letter_reasons(broker_url)
        if not report.clean or report.dead_letters:
            # The folder goes with the run: keep what the workers said, to find out why.
            kept = Path(tempfile.gettempdir()) / f"multillm-chaos-{vhost_of(broker_url)}-workers.log"
            shutil.copyfile(worker_log, kept)
            print(f"the workers' log is kept in {kept}")
    report.seconds = time.monotonic() - started
    print(report.table())
    return 0 if report.clean else 1


def _soak(
    brokers: _Brokers,
    fleet: _Fleet,
    mock: MockLLM,
    rng: random.Random,
    seed: int,
    requests: int,
    duration: float,
    report: ChaosReport,
) -> tuple[dict[str, str], dict[str, Reply]]:
    """Send the requests under faults; returns the prompt of each request the broker confirmed
    (unique, so that the mock's log tells the requests apart) by its id, and the first replies."""
    broker_url = brokers.broker_url
    control = mock.control
    control.set_fault(
        "*", error_rate=MOCK_ERROR_RATE, error_statuses=[429, 500, 502, 503, 0], retry_after=0.05, seed=seed
    )
    replies = _Replies()
    collecting = threading.Event()
    collecting.set()
    ReplyQueue(broker_url, REPLIES).declare()
    collector = threading.Thread(target=_collect, args=(broker_url, replies, collecting), daemon=True)
    collector.start()
    sending = threading.Event()
    sending.set()
    chaos = [threading.Thread(target=_wreak, args=(brokers, fleet, rng, sending, report), daemon=True)]
    if brokers.cluster is not None:
        # Its own random stream: the worker faults stay those of the same seed without a cluster.
        nodes = random.Random(seed + 1)
        chaos.append(threading.Thread(target=_kill_nodes, args=(brokers.cluster, nodes, sending, report), daemon=True))
    for thread in chaos:
        thread.start()

    sent: dict[str, str] = {}
    with Client(broker_url, timeout=60) as client, progress("sending under faults", requests) as sent_so_far:
        pace = duration / requests
        for i in range(requests):
            prompt = f"chaos request {i}"
            request = make_request(list(MODELS), prompt, display_model=0)
            try:
                sent[client.publish(request, reply_to=REPLIES)] = prompt
            except MultiLLMError:
                report.publish_failures += 1
            sent_so_far(i + 1)
            time.sleep(max(0.0, pace - 0.002))
    sending.clear()
    for thread in chaos:
        thread.join()
    control.clear_faults()

    report.requests_sent = len(sent)
    _wait_for(lambda: sum(1 for r in sent if replies.seen[r]), len(sent), patience=90, what="replies")
    collecting.clear()
    collector.join(timeout=30)
    with replies.lock:
        report.replies_received = sum(1 for r in sent if replies.seen[r])
        report.duplicate_replies = sum(n - 1 for n in replies.seen.values() if n > 1)
        report.error_replies_by_code = dict(replies.codes)
    report.lost_replies = report.requests_sent - report.replies_received
    report.records_expected = len(sent) * len(MODELS)
    with replies.lock:
        return sent, dict(replies.first)


def _wreak(brokers: _Brokers, fleet: _Fleet, rng: random.Random, sending: threading.Event, report: ChaosReport) -> None:
    """Kill or stop a random worker every few seconds; cut every connection now and then."""
    next_cut = time.monotonic() + rng.uniform(8, 15)
    while sending.wait(0) and not _sleep_while(sending, rng.uniform(2.0, 5.0)):
        report.workers_died_on_their_own += fleet.revive_dead()
        index = rng.randrange(len(fleet.workers))
        if rng.random() < 0.7:
            fleet.replace(index, "KILL")
            report.worker_kills += 1
        else:
            report.unclean_exits += fleet.replace(index, "TERM") != 0
            report.worker_sigterms += 1
        if time.monotonic() >= next_cut:
            brokers.cut_connections()
            report.connection_cuts += 1
            next_cut = time.monotonic() + rng.uniform(8, 15)


def _kill_nodes(cluster: LocalCluster, rng: random.Random, sending: threading.Event, report: ChaosReport) -> None:
    """SIGKILL a random node every 15-25 s, keep it down 5-10 s, start it again (and wait until it is back)."""
    while not _sleep_while(sending, rng.uniform(15, 25)):
        node = rng.choice(cluster.names)
        cluster.kill(node)
        report.node_kills += 1
        _sleep_while(sending, rng.uniform(5, 10))
        cluster.restart(node)


class _Brokers:
    """Where the chaos runs: a scratch vhost on this machine's broker, or on the local cluster."""

    def __init__(self, broker_url: str, cluster: LocalCluster | None) -> None:
        self.broker_url = broker_url
        self.cluster = cluster

    @classmethod
    @contextlib.contextmanager
    def on_broker(cls, broker_url: str) -> Iterator[_Brokers]:
        with scratch_vhost(broker_url, "multillm-chaos") as url:
            yield cls(url, None)

    @classmethod
    @contextlib.contextmanager
    def on_local_cluster(cls) -> Iterator[_Brokers]:
        """The local cluster, started if need be (and then stopped afterwards), whole again at the end."""
        cluster = LocalCluster()
        was_up = cluster.answering() == list(cluster.names)
        cluster.start()
        try:
            with cluster.scratch_vhost("multillm-chaos") as urls:
                try:
                    yield cls(urls, cluster)
                finally:
                    cluster.heal()  # deleting the vhost deletes quorum queues, whose members must be up
        finally:
            if not was_up:
                cluster.stop()

    def cut_connections(self) -> None:
        """Close every connection of the vhost, as a broker restart or a network blip would."""
        args = ("close_all_connections", "-p", vhost_of(self.broker_url), "chaos")
        if self.cluster is not None:
            self.cluster.rabbitmqctl_any(*args)
        else:
            rabbitmqctl(*args)


def _sleep_while(event: threading.Event, seconds: float) -> bool:
    """Sleep up to `seconds` while `event` stays set; True if it was cleared meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not event.is_set():
            return True
        time.sleep(0.1)
    return not event.is_set()


def _collect(broker_url: str, replies: _Replies, collecting: threading.Event) -> None:
    queue = ReplyQueue(broker_url, REPLIES)
    while collecting.is_set():
        try:
            queue.consume(replies.add, idle_timeout=1.0)
        except Exception:  # the connection cut mid-declare: consume again
            time.sleep(0.5)
    queue.close()


def _wait_for(count: Callable[[], int], target: int, patience: float, what: str) -> None:
    """Wait while `count()` approaches `target`, giving up after `patience` s without change."""
    last, since = -1, time.monotonic()
    with progress(f"waiting for {what}", target) as shown:
        while True:
            now = count()
            shown(now)
            if now >= target:
                return
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > patience:
                return
            time.sleep(0.5)


def _records(sink_url: str, prompts: Mapping[str, str]) -> list[LLMLogRecord]:
    """The records of the requests sent (`prompts` by request id)."""
    sink = open_sink(sink_url)
    try:
        return [r for r in sink.records() if r.request_id in prompts]
    finally:
        sink.close()


def _dead_letter_reasons(broker_url: str) -> dict[str, int]:
    """Take every message in `multillm.dead` (the vhost is deleted next) and count them by queue and reason."""
    reasons: Counter[str] = Counter()
    with connect(broker_url) as connection:
        queue = kombu.Queue(contract.DEAD_QUEUE, no_declare=True)(connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            headers = message.headers or {}
            source = headers.get(contract.HEADER_SOURCE_QUEUE, "?")
            reason = " ".join(str(headers.get(contract.HEADER_ERROR, "no reason given")).split())[:100]
            reasons[f"{source}: {reason}"] += 1
    return dict(reasons)


def _every_call(mock: MockLLM) -> list[MockCall]:
    """The mock's whole log; a full one has forgotten its oldest calls, which would go uncounted."""
    calls = mock.control.calls()
    if len(calls) >= MAX_LOGGED_CALLS:
        raise ConfigError(
            f"the mock logs its last {MAX_LOGGED_CALLS} calls only: too many to count; send fewer requests"
        )
    return calls

"""Every Prometheus metric a worker exports, defined here and nowhere else.

A worker builds one `WorkerMetrics` (its own `CollectorRegistry`, not the global
one, so that tests and several workers in one process never collide) and passes
it to the parts that count: the consumer loop, the model runner, the providers
and the sink (through `GroupCommit`'s observer). `serve` exposes it over HTTP only when
`--metrics-port` is given. All metrics carry `kind` (`primary`, `model` or `judge`).

| metric | type | labels (besides kind) | counts or measures |
|---|---|---|---|
| `multillm_messages_consumed_total` | counter | queue | deliveries taken (redeliveries too) |
| `multillm_redeliveries_total` | counter | queue | deliveries marked redelivered |
| `multillm_given_up_total` | counter | queue | messages settled for good after too many deliveries |
| `multillm_replies_sent_total` | counter | outcome, code | confirmed replies: ok/`OK`, error/gRPC code name |
| `multillm_errors_total` | counter | model, code | models of a request that ended in error, by code name |
| `multillm_model_call_seconds` | histogram | model | model call wall time, retries included |
| `multillm_model_calls_in_flight` | gauge | model | model calls running now |
| `multillm_retries_total` | counter | model, reason | retries; reason = HTTP status or error type |
| `multillm_fanout_copies_total` | counter | model, result | copies: published, unroutable, refused |
| `multillm_stream_chunks_total` | counter | result | chunks of streamed answers: published, refused |
| `multillm_publish_failures_total` | counter | target, result | replies/dead letters/records' stream not taken |
| `multillm_dead_letters_total` | counter | queue, code | messages put into `multillm.dead` |
| `multillm_sink_write_seconds` | histogram | | one try of writing a record (the time of the batch it went in) |
| `multillm_sink_write_failures_total` | counter | | tries that raised |
| `multillm_event_loop_lag_seconds` | histogram | | how late the event loop ran a timer (workers/loop_lag.py) |

docs/metrics.md says more about each, with PromQL.

Label values are bounded: every metric keeps at most `MAX_SERIES` label sets, and
counts further ones under `other` (model names come from requests). No label
ever holds an api key, a prompt or a request id.
"""

from __future__ import annotations

import errno
import threading
from enum import StrEnum
from typing import Final, Generic, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from multillm.errors import ConfigError, code_name
from multillm.schemas import LLMLogRecord

log = structlog.get_logger(__name__)

# Label sets per metric before new ones are folded into `other`.
MAX_SERIES: Final = 1000
# From a cached mock answer (~10 ms) to a long generation with retries (60 s).
MODEL_CALL_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# A local SQLite insert (~1 ms) to a database that stalls (10 s).
SINK_WRITE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# An idle loop (under 1 ms) to one stalled for seconds.
LOOP_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The name the benchmark reads back from a worker's /metrics.
LOOP_LAG: Final = "multillm_event_loop_lag_seconds"

M = TypeVar("M", bound=MetricWrapperBase)


class Published(StrEnum):
    """What a worker publishes, as its builder knows it (the metrics never read a body back)."""

    REPLY = "reply"
    FANOUT = "fanout"
    DEAD_LETTER = "dead_letter"
    RECORD = "record"
    CHUNK = "chunk"


class _Children(Generic[M]):
    """A labelled metric's children by label values, with `kind` filled in.

    `prometheus_client`'s own `labels()` takes a lock and builds a key on every
    call; this dict lookup is all the hot path pays once a label set was seen.
    """

    def __init__(self, metric: M, kind: str) -> None:
        self._metric = metric
        self._kind = kind
        self._children: dict[tuple[str, ...], M] = {}
        self._lock = threading.Lock()

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._add(values)
        return child

    def _add(self, values: tuple[str, ...]) -> M:
        with self._lock:
            if len(self._children) >= MAX_SERIES:
                # Not remembered under its own values: they are what must not pile up.
                values = ("other",) * len(values)
            child = self._children.get(values)
            if child is None:
                child = self._children[values] = self._metric.labels(self._kind, *values)
            return child


class WorkerMetrics:
    """The metrics of one worker, in a registry of its own; every method is thread-safe and cheap.

    Args:
        kind: `primary`, `model` or `judge`, the `kind` label of every metric.
    """

    def __init__(self, kind: str = "unserved") -> None:
        self.kind = kind
        self.registry = CollectorRegistry()
        # CPU and memory of the worker process, as the global registry would have them.
        ProcessCollector(registry=self.registry)
        self._consumed = self._counter("messages_consumed", "Deliveries taken from the queue", "queue")
        self._redelivered = self._counter("redeliveries", "Deliveries marked as redelivered", "queue")
        self._given_up = self._counter("given_up", "Messages settled for good after too many deliveries", "queue")
        self._replies = self._counter("replies_sent", "Replies the broker confirmed", "outcome", "code")
        self._errors = self._counter("errors", "Models of a request that ended in error", "model", "code")
        self._latency = self._histogram(
            "model_call_seconds", "Wall time of a model call, retries included", MODEL_CALL_BUCKETS, "model"
        )
        self._in_flight = _Children(
            Gauge(
                "multillm_model_calls_in_flight", "Model calls running now", ["kind", "model"], registry=self.registry
            ),
            kind,
        )
        self._retries = self._counter("retries", "Retries of model calls", "model", "reason")
        self._fanout = self._counter("fanout_copies", "Fan-out copies published", "model", "result")
        self._chunks = self._counter("stream_chunks", "Chunks of streamed answers published", "result")
        self._publish_failures = self._counter(
            "publish_failures", "Replies and dead letters the broker did not take", "target", "result"
        )
        self._dead_letters = self._counter("dead_letters", "Messages put into multillm.dead", "queue", "code")
        self._sink_latency = self._histogram(
            "sink_write_seconds", "Time of one write of a record to the sink", SINK_WRITE_BUCKETS
        )
        self._sink_failures = self._counter("sink_write_failures", "Sink writes that raised")
        self._loop_lag = self._histogram(
            LOOP_LAG.removeprefix("multillm_"), "How late the event loop ran a timer", LOOP_LAG_BUCKETS
        )

    def _counter(self, name: str, documentation: str, *labels: str) -> _Children[Counter]:
        metric = Counter(f"multillm_{name}", documentation, ["kind", *labels], registry=self.registry)
        return _Children(metric, self.kind)

    def _histogram(
        self, name: str, documentation: str, buckets: tuple[float, ...], *labels: str
    ) -> _Children[Histogram]:
        metric = Histogram(
            f"multillm_{name}", documentation, ["kind", *labels], buckets=buckets, registry=self.registry
        )
        return _Children(metric, self.kind)

    # --- the consumer loop ---------------------------------------------------

    def consumed(self, queue: str, redelivered: bool, given_up: bool) -> None:
        """A delivery arrived on `queue`."""
        self._consumed(queue).inc()
        if redelivered:
            self._redelivered(queue).inc()
        if given_up:
            self._given_up(queue).inc()

    def published(self, kind: Published, about: str, code: int, result: str) -> None:
        """The broker answered a publish: `ok`, `unroutable` (no queue took it) or `refused` (nacked).

        `about`: the model of a fan-out copy, the source queue of a dead letter; `code`: the
        status of a reply or dead letter (0 for a completion).
        """
        if kind is Published.FANOUT:
            self._fanout(about, "published" if result == "ok" else result).inc()
        elif kind is Published.CHUNK:
            self._chunks("published" if result == "ok" else result).inc()
        elif result != "ok":
            self._publish_failures(kind.value, result).inc()
        elif kind is Published.DEAD_LETTER:
            self._dead_letters(about, code_name(code)).inc()
        elif kind is Published.RECORD:
            return  # the records' stream: only a failure is news
        elif code:
            self._replies("error", code_name(code)).inc()
        else:
            self._replies("ok", "OK").inc()

    # --- model calls ------------------------------------------------------------

    def call_started(self, model: str) -> None:
        self._in_flight(model).inc()

    def call_ended(self, model: str) -> None:
        self._in_flight(model).dec()

    def recorded(self, record: LLMLogRecord) -> None:
        """A model's outcome became a record: its latency if it was called, its error code if it failed."""
        if record.attempts:
            self._latency(record.model_name).observe((record.latency_ms or 0.0) / 1000)
        if record.status != "ok":
            self._errors(record.model_name, code_name(record.error_code)).inc()

    def retried(self, model: str, reason: str) -> None:
        """A model call is about to be tried again after `reason` (an HTTP status or an error type)."""
        self._retries(model, reason).inc()

    # --- the sink ---------------------------------------------------------------

    def sink_written(self, seconds: float, failed: bool) -> None:
        self._sink_latency().observe(seconds)
        if failed:
            self._sink_failures().inc()

    # --- the event loop -----------------------------------------------------------

    def loop_lag(self, seconds: float) -> None:
        self._loop_lag().observe(seconds)


def serve(metrics: WorkerMetrics, port: int, host: str = "0.0.0.0") -> int:
    """Serve `metrics` at `http://host:port/metrics` from a daemon thread; returns the port (0 picks a free one).

    Raises:
        ConfigError: the port cannot be bound (in use, or not ours to take).
    """
    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
        raise ConfigError(f"metrics port {port} {reason}; pick another with --metrics-port") from None
    chosen: int = server.server_port
    log.info("metrics.serving", port=chosen, url=f"http://{host}:{chosen}/metrics")
    return chosen


__all__ = ["MAX_SERIES", "WorkerMetrics", "code_name", "serve"]

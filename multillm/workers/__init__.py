"""Long-running pika consumers: the primary worker, the per-model worker and the judge."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import structlog

from multillm.config import Settings
from multillm.errors import ConfigError
from multillm.judging import DEFAULT_PROMPT
from multillm.metrics import WorkerMetrics, serve
from multillm.pricing import Prices
from multillm.providers import Providers
from multillm.schemas import model_name_problem
from multillm.sinks import open_sink
from multillm.workers.consumer import Consumer
from multillm.workers.judge import JudgeHandler
from multillm.workers.loop_lag import LoopLag
from multillm.workers.messages import Handler
from multillm.workers.model import ModelHandler
from multillm.workers.model_run import ModelRunner
from multillm.workers.primary import PrimaryHandler
from multillm.workers.scores import ScoreHandler
from multillm.workers.storage import Storage
from multillm.workers.triage import TriageHandler

__all__ = ["run_judge_worker", "run_model_worker", "run_primary_worker"]

log = structlog.get_logger(__name__)


# Threads for the sink's blocking calls: one writes a batch at a time (workers/group_commit.py),
# another may look up the records of a redelivered message. Not the loop's default executor:
# pika and aiohttp resolve names there, and a hung database must not stop a reconnect.
SINK_THREADS = 2
# How long a stopping worker waits for a record write in progress before it leaves the sink's
# threads as they are (a database that stopped answering must not hold the exit).
SINK_CLOSE_SECONDS = 5.0


def _runner(settings: Settings, metrics: WorkerMetrics, concurrency: int) -> tuple[Providers, ModelRunner]:
    providers = Providers(settings.providers, settings.retry, metrics, max_connections=concurrency)
    sink_threads = ThreadPoolExecutor(SINK_THREADS, thread_name_prefix="sink")
    # The storage owns the sink and its threads from here on, and closes them (`Storage.close`).
    storage = Storage(open_sink(settings.sink_url), sink_threads, metrics)
    prices = Prices(settings.providers, settings.prices)
    return providers, ModelRunner(providers, storage, metrics, prices)


def _metrics(kind: str, port: int | None) -> WorkerMetrics:
    # Counted either way (it costs microseconds); served only when asked, before the broker
    # is contacted, so that a busy port fails the start at once.
    metrics = WorkerMetrics(kind)
    if port is not None:
        serve(metrics, port)
    return metrics


def _tune_gc() -> None:
    # A worker allocates many short-lived objects per message, freed by reference counting;
    # a model call makes no cycles (test_providers checks), so a collection finds nothing
    # and only stops the loop while it scans the calls in flight (50-100 ms at 512). Freezing
    # what start-up built (modules, the SDK, pika) keeps it from re-scanning that; a gen-0
    # threshold of 100,000 makes it rare (at 512 one-second calls: one collection in 46 s
    # against 13-27 at 20,000, which had bought 7% over the default of 700). The rare cycle
    # (a cancelled call) still goes, within 100,000 allocations.
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)


def _serve(
    settings: Settings,
    handlers: list[Handler],
    runner: ModelRunner,
    providers: Providers,
    concurrency: int,
    metrics: WorkerMetrics,
    serves: list[str] | None = None,
) -> int:
    """Consume `handlers`' queues on an event loop until SIGTERM or SIGINT; returns the exit code.

    `serves`: the providers whose clients to build before consuming (all configured: None).

    The first signal stops the worker, in this order, each step once the one before is done:

    1. cancel the consumers: no new deliveries (`Consumer`);
    2. requeue the deliveries that have not begun (waiting for a call slot), for other workers;
    3. drain: the calls in flight finish, each is settled, its publishes confirmed and its ack
       sent, for up to `shutdown_grace_seconds`;
    4. close the connection: the broker redelivers whatever is still unsettled;
    5. cancel the calls still running past the grace period (their messages are redelivered);
    6. close the providers' HTTP connections;
    7. close the sink and its threads, once no call is left to write a record, waiting at
       most `SINK_CLOSE_SECONDS` for a write in progress (none after a second signal).

    A second signal skips what is left of steps 1 and 3 (exit code 1). Exiting the process is
    the caller's business (the CLI's), with the code returned here; a sink thread left stuck
    in step 7 is why the CLI ends a worker with `os._exit`.
    """
    aborted = False

    async def serve() -> int:
        consumer = Consumer(
            settings.broker_url,
            handlers,
            concurrency=concurrency,
            grace_seconds=settings.shutdown_grace_seconds,
            metrics=metrics,
            failover=settings.broker_failover,
        )
        _on_signals(consumer)
        lag = LoopLag(metrics.loop_lag, concurrency)
        try:
            providers.open(serves)
            lag.start()
            return await consumer.serve()  # steps 1-4
        finally:
            nonlocal aborted
            aborted = consumer.aborted
            lag.stop()
            await consumer.cancel_running()  # step 5
            await providers.aclose()  # step 6

    _tune_gc()
    try:
        return asyncio.run(serve())
    finally:
        runner.storage.close(0.0 if aborted else SINK_CLOSE_SECONDS)  # step 7


def _on_signals(consumer: Consumer) -> None:
    """SIGTERM or SIGINT stops `consumer`; a second one aborts it (only the main thread can handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info("worker.stopping", signal=signum.name, in_flight=consumer.in_flight)
            consumer.stop()
        else:
            # A second signal means now: what was not acked is redelivered by the broker.
            log.warning("worker.killed", signal=signum.name, unacked=consumer.in_flight)
            consumer.abort()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def run_primary_worker(settings: Settings, concurrency: int, metrics_port: int | None = None) -> int:
    """Serve `multillm.requests`, and `multillm.triage` and `multillm.scores` beside it, until SIGTERM;
    returns the exit code.

    Raises:
        ConfigError: `metrics_port` cannot be bound, or a provider's client cannot be built.
    """
    metrics = _metrics("primary", metrics_port)
    providers, runner = _runner(settings, metrics, concurrency)
    primary = PrimaryHandler(providers, runner, settings.max_body_bytes, settings.stream)
    triage = TriageHandler(primary, runner, settings.max_body_bytes)
    scores = ScoreHandler(runner.storage, settings.max_body_bytes)
    return _serve(settings, [primary, triage, scores], runner, providers, concurrency, metrics)


def _served_provider(settings: Settings, model: str) -> str:
    """The provider of `model`, which a worker is about to serve.

    Raises:
        ConfigError: `model` is no valid model name, or its provider is not configured.
    """
    if problem := model_name_problem(model):
        # Checked before anything starts: no request may name it, and its queue could not be declared.
        raise ConfigError(problem)
    provider = model.split("/", 1)[0]
    if provider not in settings.providers:
        raise ConfigError(
            f"model {model!r} names provider {provider!r}, which is not configured"
            f" (configured: {', '.join(sorted(settings.providers)) or 'none'})"
        )
    return provider


def run_model_worker(settings: Settings, model: str, concurrency: int, metrics_port: int | None = None) -> int:
    """Serve `multillm.model.<model>` until SIGTERM; returns the exit code.

    Raises:
        ConfigError: `model` is no valid model name, its provider is not configured or its
            client cannot be built, or `metrics_port` cannot be bound.
    """
    provider = _served_provider(settings, model)
    metrics = _metrics("model", metrics_port)
    providers, runner = _runner(settings, metrics, concurrency)
    handler = ModelHandler(model, runner, settings.max_body_bytes)
    return _serve(settings, [handler], runner, providers, concurrency, metrics, serves=[provider])


def run_judge_worker(
    settings: Settings, model: str, concurrency: int, sample: float = 1.0, metrics_port: int | None = None
) -> int:
    """Serve `multillm.judge` with judge model `model`, judging a `sample` of the requests, until
    SIGTERM; returns the exit code.

    Raises:
        ConfigError: as `run_model_worker`.
    """
    provider = _served_provider(settings, model)
    metrics = _metrics("judge", metrics_port)
    providers, runner = _runner(settings, metrics, concurrency)
    prompt = settings.judge.prompt or DEFAULT_PROMPT
    handler = JudgeHandler(model, runner, sample, prompt, settings.max_body_bytes)
    return _serve(settings, [handler], runner, providers, concurrency, metrics, serves=[provider])

"""Long-running pika consumers: the primary worker and the per-model worker."""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor

from multillm.config import Settings
from multillm.errors import ConfigError
from multillm.metrics import WorkerMetrics, serve
from multillm.providers import Providers
from multillm.schemas import model_name_problem
from multillm.sinks import open_sink
from multillm.workers.consumer import Consumer
from multillm.workers.loop_lag import LoopLag
from multillm.workers.messages import Handler
from multillm.workers.model import ModelHandler
from multillm.workers.model_run import ModelRunner
from multillm.workers.primary import PrimaryHandler
from multillm.workers.triage import TriageHandler

__all__ = ["run_model_worker", "run_primary_worker"]


# Threads for the sink's blocking calls: one writes a batch at a time (sinks/group_commit.py),
# another may look up the records of a redelivered message. Not the loop's default executor:
# pika and aiohttp resolve names there, and a hung database must not stop a reconnect.
SINK_THREADS = 2


def _runner(settings: Settings, metrics: WorkerMetrics, concurrency: int) -> tuple[Providers, ModelRunner]:
    providers = Providers(settings.providers, settings.retry, metrics, max_connections=concurrency)
    sink_threads = ThreadPoolExecutor(SINK_THREADS, thread_name_prefix="sink")
    return providers, ModelRunner(providers, open_sink(settings.sink_url), metrics, sink_threads)


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
    providers: Providers,
    concurrency: int,
    metrics: WorkerMetrics,
    serves: list[str] | None = None,
) -> int:
    """Consume `handlers`' queues on an event loop until SIGTERM, once start-up is done; returns the exit code.

    `serves`: the providers whose clients to build before consuming (all configured: None).
    """

    async def serve() -> int:
        consumer = Consumer(
            settings.broker_url,
            handlers,
            concurrency=concurrency,
            grace_seconds=settings.shutdown_grace_seconds,
            metrics=metrics,
        )
        lag = LoopLag(metrics.loop_lag, concurrency)
        try:
            providers.open(serves)
            lag.start()
            return await consumer.serve()
        finally:
            lag.stop()
            # Every call has ended (a worker with calls left past the grace period exits in `serve`).
            await providers.aclose()

    _tune_gc()
    return asyncio.run(serve())


def run_primary_worker(settings: Settings, concurrency: int, metrics_port: int | None = None) -> int:
    """Serve `multillm.requests`, and `multillm.triage` beside it, until SIGTERM; returns the exit code.

    Raises:
        ConfigError: `metrics_port` cannot be bound, or a provider's client cannot be built.
    """
    metrics = _metrics("primary", metrics_port)
    providers, runner = _runner(settings, metrics, concurrency)
    primary = PrimaryHandler(providers, runner, settings.max_body_bytes)
    triage = TriageHandler(primary, runner, settings.max_body_bytes)
    return _serve(settings, [primary, triage], providers, concurrency, metrics)


def run_model_worker(settings: Settings, model: str, concurrency: int, metrics_port: int | None = None) -> int:
    """Serve `multillm.model.<model>` until SIGTERM; returns the exit code.

    Raises:
        ConfigError: `model` is no valid model name, its provider is not configured or its
            client cannot be built, or `metrics_port` cannot be bound.
    """
    if problem := model_name_problem(model):
        # Checked before anything starts: no request may name it, and its queue could not be declared.
        raise ConfigError(problem)
    metrics = _metrics("model", metrics_port)
    providers, runner = _runner(settings, metrics, concurrency)
    provider = model.split("/", 1)[0]
    if not providers.has(provider):
        raise ConfigError(
            f"model {model!r} names provider {provider!r}, which is not configured"
            f" (configured: {', '.join(providers.names()) or 'none'})"
        )
    handler = ModelHandler(model, runner, settings.max_body_bytes)
    return _serve(settings, [handler], providers, concurrency, metrics, serves=[provider])

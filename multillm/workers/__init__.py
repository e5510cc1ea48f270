"""Long-running pika consumers: the primary worker and the per-model worker."""

from __future__ import annotations

from multillm.config import Settings
from multillm.errors import ConfigError
from multillm.providers import Providers
from multillm.sinks import open_sink
from multillm.sinks.group_commit import GroupCommitSink
from multillm.workers.consumer import Consumer
from multillm.workers.model import ModelHandler
from multillm.workers.model_run import ModelRunner
from multillm.workers.primary import PrimaryHandler

__all__ = ["run_model_worker", "run_primary_worker"]


def _runner(settings: Settings) -> tuple[Providers, ModelRunner]:
    providers = Providers(settings.providers, settings.retry)
    # Records of calls that end together are stored in one transaction (see group_commit).
    return providers, ModelRunner(providers, GroupCommitSink(open_sink(settings.sink_url)))


def run_primary_worker(settings: Settings, concurrency: int) -> int:
    """Serve `multillm.requests` until SIGTERM; returns the exit code."""
    providers, runner = _runner(settings)
    handler = PrimaryHandler(providers, runner, settings.max_body_bytes)
    return Consumer(
        settings.broker_url, handler, concurrency=concurrency, grace_seconds=settings.shutdown_grace_seconds
    ).run()


def run_model_worker(settings: Settings, model: str, concurrency: int) -> int:
    """Serve `multillm.model.<model>` until SIGTERM; returns the exit code."""
    providers, runner = _runner(settings)
    provider = model.split("/", 1)[0]
    if "/" not in model or not providers.has(provider):
        raise ConfigError(
            f"model {model!r} must be `provider/model` with a configured provider"
            f" (configured: {', '.join(providers.names()) or 'none'})"
        )
    handler = ModelHandler(model, runner, settings.max_body_bytes)
    return Consumer(
        settings.broker_url, handler, concurrency=concurrency, grace_seconds=settings.shutdown_grace_seconds
    ).run()

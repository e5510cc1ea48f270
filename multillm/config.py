"""Settings: `multillm.toml` (or `--config PATH`), then environment overrides.

Loaded once, by the CLI, into typed Structs. Unknown keys in the file are an
error that names them (msgspec's `forbid_unknown_fields`), unlike messages,
where unknown fields are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from multillm.errors import ConfigError
from multillm.schemas import model_name_problem
from multillm.urls import NODE_SEPARATOR, broker_nodes

DEFAULT_BROKER_URL: Final = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_SINK_URL: Final = "sqlite:///multillm-logs.db"
DEFAULT_CONFIG_FILE: Final = "multillm.toml"
DEFAULT_MOCK_PORT: Final = 8089
# The mock's latency in `multillm mock-llm` and the demo: about a small model's, so that
# replies and the per-model records arriving later look as they will in production.
DEFAULT_MOCK_LATENCY_MS: Final = 150.0
# Between the tokens of a streamed answer of `multillm mock-llm` and the demo's mock: 33 tokens a
# second, so that a streamed answer is seen arriving.
DEFAULT_MOCK_TOKEN_DELAY_MS: Final = 30.0

ENV_BROKER_URL: Final = "MULTILLM_BROKER_URL"
ENV_SINK_URL: Final = "MULTILLM_SINK_URL"
ENV_CONFIG: Final = "MULTILLM_CONFIG"
# Read by the CLI only (`--log-level`'s default): a library leaves logging to its application.
ENV_LOG_LEVEL: Final = "MULTILLM_LOG_LEVEL"

PositiveFloat = Annotated[float, Meta(gt=0)]
# Where a worker starts in a list of broker nodes (workers/nodes.py); kombu's names.
Failover = Literal["shuffle", "round-robin"]


def client_broker_url(broker_url: str | None) -> str:
    """Where a client connects: `broker_url`, or if None `$MULTILLM_BROKER_URL`, else `DEFAULT_BROKER_URL`.

    Raises:
        ConfigError: the URL, or an entry of its node list, is malformed (named, password masked).
    """
    if broker_url is None:
        broker_url = os.environ.get(ENV_BROKER_URL) or DEFAULT_BROKER_URL
    # Joined again from the checked entries: kombu would read the spaces around a ';' into them.
    return NODE_SEPARATOR.join(broker_nodes(broker_url))


class ProviderConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One OpenAI-compatible endpoint. The key is inline or read from `api_key_env`."""

    base_url: str
    api_key: str | None = None
    api_key_env: str | None = None
    timeout: PositiveFloat = 60.0

    def __repr__(self) -> str:
        return f"ProviderConfig(base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def configured_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


# USD per million tokens: finite, not negative (a free model is 0).
_PerMTok = Annotated[float, Meta(ge=0, le=1e9)]


class PriceOverride(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """`[prices."provider/model"]`: a model's price, instead of genai-prices' table (see pricing.py)."""

    input_per_mtok: _PerMTok
    output_per_mtok: _PerMTok
    # Prompt tokens the provider read from its cache; priced as input when not given.
    cached_input_per_mtok: _PerMTok | None = None


class RetryConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The one retry policy around model calls (see `multillm.providers.retry`)."""

    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 4
    initial_wait: PositiveFloat = 0.5
    max_wait: PositiveFloat = 10.0
    budget_seconds: PositiveFloat = 60.0


class PublishRetryPolicy(Struct, frozen=True, kw_only=True):
    """kombu's reconnect-and-retry loop around one publish or declaration of the client library.

    kombu waits `interval_start` seconds before the first retry, `interval_step` more before
    each next one, never more than `interval_max`; after `max_retries` it raises. The fields
    are the keys of kombu's `retry_policy` (`Producer.publish`, `Connection.ensure`).
    """

    max_retries: int
    interval_start: float
    interval_step: float
    interval_max: float

    def kombu(self, within: float | None = None, nodes: int = 1) -> dict[str, float]:
        """The `retry_policy` mapping; with `within` (a caller's timeout, in seconds), at most one
        retry per `interval_max` seconds of it, and at least one, so that retrying ends about then.

        `nodes`: how many the broker URL lists. kombu tries the next node at once and waits only
        after a whole round of them, so each retry here is a round: `nodes` tries.
        """
        policy: dict[str, float] = msgspec.structs.asdict(self)
        if within is not None:
            policy["max_retries"] = max(1, min(self.max_retries, int(within // self.interval_max)))
        policy["max_retries"] *= nodes
        return policy


# Not a setting (no key in the file): a broker restart or a failover takes seconds, so kombu
# retries a publish ten times, 16 s of waits (0.2, 0.7, 1.2, 1.7 s, then 2 s apart) and about
# 20 s with the tries (each retry a round of every node listed), before `Client` raises
# BrokerUnavailable: the caller then knows the request was not sent. A caller's shorter
# timeout allows fewer retries (`kombu(within=...)`).
PUBLISH_RETRY: Final = PublishRetryPolicy(max_retries=10, interval_start=0.2, interval_step=0.5, interval_max=2.0)

# The waits, in seconds, before a worker publishes again a message the broker refused (a
# nack). A quorum queue may refuse while it cannot take a message just then; one that still
# refuses after the last wait (3.4 s in all) is full, and the message counts as refused: a
# fan-out copy becomes an error record, a reply a dead letter, anything else a requeue.
REFUSED_PUBLISH_WAITS: Final = (0.1, 0.3, 1.0, 2.0)

# The waits, in seconds, before a worker's second, third and fourth try at writing a record
# the sink refused. A brief outage (a database restart) is waited out, keeping the model's
# answer instead of calling the model again; past the last one (4.2 s in all, while the call
# slot stays taken) the record goes to `multillm.dead` to be replayed (`multillm logs replay-dead`).
SINK_RETRY_WAITS: Final = (0.2, 1.0, 3.0)

# A worker whose broker went away reconnects after this many seconds, doubling up to the
# most, each wait jittered by x0.5-1.5 so that a fleet does not come back in step. The
# first is short: a connection cut by a proxy is back at once; the most bounds how long a
# broker back from an outage waits for its workers.
RECONNECT_FIRST_WAIT: Final = 0.5
RECONNECT_MAX_WAIT: Final = 15.0

# A worker's prefetch, per queue it consumes, in call slots (`--concurrency`): with twice
# the slots, a slot that frees finds its next message waiting instead of idling through an
# ack and a delivery (docs/benchmarks.md: +10-15% at latency 0).
PREFETCH_PER_CALL: Final = 2


class JudgeConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """`[judge]`: how `multillm worker judge` asks (multillm/judging.py)."""

    # The judge's instructions (its system message); multillm.judging.DEFAULT_PROMPT when absent.
    # The conversation and the two answers follow in the user message, in <conversation>,
    # <answer_a> and <answer_b> tags, and the answer must be JSON {"winner": "A"|"B"|"tie", "reason"}.
    prompt: Annotated[str, Meta(min_length=1)] | None = None


class StreamConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """`[stream]`: how the primary worker coalesces a streamed answer's deltas into chunk messages
    (workers/streaming.py). The first delta of each try goes out at once; after it, a chunk goes
    out when the oldest delta it holds is `flush_ms` old or it holds `flush_bytes` of text. The
    defaults were measured with `multillm bench` (docs/benchmarks.md, "Streaming")."""

    flush_ms: Annotated[float, Meta(ge=0, le=10_000)] = 50.0
    flush_bytes: Annotated[int, Meta(ge=1, le=1024 * 1024)] = 4096


class Settings(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    # One AMQP URL, or the nodes of one cluster joined by `;` (checked by `load_settings`).
    broker_url: str = DEFAULT_BROKER_URL
    # Where a worker starts in that list: a random node, to spread a fleet over the cluster,
    # or the first ("round-robin", kombu's name, as the clients do). See workers/nodes.py.
    broker_failover: Failover = "shuffle"
    sink_url: str = DEFAULT_SINK_URL
    providers: dict[str, ProviderConfig] = msgspec.field(default_factory=dict)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    prices: dict[str, PriceOverride] = msgspec.field(default_factory=dict)
    judge: JudgeConfig = msgspec.field(default_factory=JudgeConfig)
    stream: StreamConfig = msgspec.field(default_factory=StreamConfig)
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    shutdown_grace_seconds: PositiveFloat = 30.0
    # The broker's consumer_timeout (RabbitMQ's default: 30 min). A model call and
    # all its retries must end well inside it, or the broker closes the channel
    # and redelivers a message that is still being worked on.
    consumer_timeout_seconds: PositiveFloat = 1800.0

    def __post_init__(self) -> None:
        for name in self.prices:
            if problem := model_name_problem(name):
                raise ValueError(f'prices."{name}": {problem}')
        if self.retry.budget_seconds >= self.consumer_timeout_seconds / 2:
            raise ValueError(
                f"retry.budget_seconds ({self.retry.budget_seconds:g}) must stay under half of "
                f"consumer_timeout_seconds ({self.consumer_timeout_seconds:g})"
            )


def default_providers() -> dict[str, ProviderConfig]:
    """Used when there is no config file: the bundled mock and OpenAI."""
    return {
        "mock": ProviderConfig(base_url=f"http://127.0.0.1:{DEFAULT_MOCK_PORT}/v1", api_key="unused"),
        "openai": ProviderConfig(base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY"),
    }


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the file (explicit path, `$MULTILLM_CONFIG`, or ./multillm.toml if present) and the env.

    Raises:
        ConfigError: the file is missing (when named), unreadable, or has a bad or unknown key.
    """
    named = path or os.environ.get(ENV_CONFIG)
    file = Path(named) if named else Path(DEFAULT_CONFIG_FILE)
    if file.exists():
        try:
            settings = msgspec.toml.decode(file.read_bytes(), type=Settings)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ConfigError(f"{file}: {exc}") from None
    elif named:
        raise ConfigError(f"config file {file} does not exist")
    else:
        settings = Settings(providers=default_providers())
    overrides: dict[str, str] = {}
    broker_source = f"{file}: broker_url"
    if broker := os.environ.get(ENV_BROKER_URL):
        overrides["broker_url"], broker_source = broker, ENV_BROKER_URL
    if sink := os.environ.get(ENV_SINK_URL):
        overrides["sink_url"] = sink
    settings = msgspec.structs.replace(settings, **overrides) if overrides else settings
    try:
        broker_nodes(settings.broker_url)
    except ConfigError as exc:
        raise ConfigError(f"{broker_source}: {exc}") from None
    return settings

"""Ways to call a model, chosen by the `provider` part of `provider/model`.

Every provider is an OpenAI-compatible endpoint called through the openai SDK
(`openai_compat`), wrapped in the one retry loop (`retry`). `Providers` is the
registry a worker holds: built from the settings, the clients of the providers
it serves built when it starts (`open`), then shared by every call of its event loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Iterable, Mapping
from typing import Protocol

import httpx2
import openai

from multillm import tracing
from multillm.config import ProviderConfig, RetryConfig
from multillm.errors import Code, ConfigError, ProviderError, describe
from multillm.metrics import WorkerMetrics
from multillm.providers.openai_compat import (
    JsonSchemaFormat,
    ModelCall,
    ModelResult,
    OpenAICompatProvider,
    StreamListener,
)
from multillm.redact import scrub
from multillm.schemas import ChatMessage, V1Model

__all__ = [
    "JsonSchemaFormat",
    "ModelCall",
    "ModelResult",
    "OpenAICompatProvider",
    "Provider",
    "ProviderError",
    "Providers",
    "StreamListener",
]


class Provider(Protocol):
    """One way to call models, from one event loop."""

    async def complete(self, call: ModelCall) -> ModelResult:
        """Ask for one chat completion.

        Raises:
            ProviderError: the call failed for good (after the retries that made sense).
        """
        ...


class Providers:
    """The providers named in the settings, by name.

    A worker uses it from its one event loop only. `has`, `names` and `get` are safe from any
    thread as well, for a program that embeds it with threads (`get` builds each provider once);
    `open`, `complete` and `aclose` belong to one event loop, the one whose calls use the clients.

    Args:
        providers: each provider's endpoint and key, by the name used in model names.
        retry: the retry policy of every call.
        metrics: where the providers count retries (none when None).
        max_connections: connections each provider keeps open: the worker's concurrency.
    """

    def __init__(
        self,
        providers: Mapping[str, ProviderConfig],
        retry: RetryConfig,
        metrics: WorkerMetrics | None = None,
        max_connections: int = 100,
    ) -> None:
        self._configs = dict(providers)
        self._retry = retry
        self._metrics = metrics
        self._max_connections = max_connections
        self._built: dict[str, OpenAICompatProvider] = {}
        self._lock = threading.Lock()

    def has(self, provider_name: str) -> bool:
        """Whether `provider_name` is configured."""
        return provider_name in self._configs

    def names(self) -> list[str]:
        """The configured providers' names, sorted."""
        return sorted(self._configs)

    def get(self, provider_name: str) -> Provider:
        """The provider called `provider_name` (built on first use; its client by `open`, or at its first call).

        Raises:
            ProviderError: INVALID_ARGUMENT, the provider is not configured.
        """
        return self._built_provider(provider_name)

    def _built_provider(self, provider_name: str) -> OpenAICompatProvider:
        provider = self._built.get(provider_name)
        if provider is not None:
            return provider
        config = self._configs.get(provider_name)
        if config is None:
            known = ", ".join(sorted(self._configs)) or "none"
            raise ProviderError(Code.INVALID_ARGUMENT, f"unknown provider {provider_name!r} (configured: {known})")
        with self._lock:
            # A worker's loop never waits here; a caller on another thread (see the class
            # docstring) may have built it while this one waited.
            provider = self._built.get(provider_name)
            if provider is None:
                provider = OpenAICompatProvider(
                    provider_name, config, self._retry, self._metrics, self._max_connections
                )
                self._built[provider_name] = provider
            return provider

    def open(self, names: Iterable[str] | None = None) -> None:
        """Build the clients of providers `names` (all configured: None) now, before the worker takes messages.

        Building one loads the CA bundle and the HTTP stack (20-60 ms here); left to the first
        call, it would stop the loop while the messages prefetched at start wait.

        Raises:
            ConfigError: a client cannot be built (an unusable base URL, `SSL_CERT_FILE` naming no file).
        """
        for name in self._configs if names is None else names:
            provider = self._built_provider(name)
            try:
                provider.open()
            except (OSError, ValueError, httpx2.InvalidURL, openai.OpenAIError) as exc:
                problem = scrub(describe(exc), [self._configs[name].configured_key()])
                if isinstance(exc, OSError) and (cert_file := os.environ.get("SSL_CERT_FILE")):
                    problem += f" (SSL_CERT_FILE is {cert_file!r})"  # ssl's own message names no file
                raise ConfigError(f"provider {name!r}: cannot build its client: {problem}") from None

    async def complete(
        self, model: V1Model, messages: list[ChatMessage], response_format: JsonSchemaFormat | None = None
    ) -> ModelResult:
        """Call `model` (`provider/model`, with its temperature, max tokens and key) on `messages`,
        asking for an answer in `response_format` when given.

        Raises:
            ProviderError: the provider is unknown (INVALID_ARGUMENT) or the call failed for good.
        """
        provider = self._built_provider(model.provider)
        call = _call(model, messages, response_format)
        return await self._traced(model.provider, call, provider.complete(call))

    async def stream(self, model: V1Model, messages: list[ChatMessage], listener: StreamListener) -> ModelResult:
        """As `complete`, streamed: `listener` is told each try's start and each text delta.

        Raises:
            ProviderError: the provider is unknown (INVALID_ARGUMENT) or the call failed for good.
        """
        provider = self._built_provider(model.provider)
        call = _call(model, messages)
        return await self._traced(model.provider, call, provider.stream(call, listener))

    async def _traced(self, provider: str, call: ModelCall, answer: Awaitable[ModelResult]) -> ModelResult:
        """`answer`, in a GenAI span of its own when this process exports traces."""
        if not tracing.ENABLED:
            return await answer
        span = tracing.model_call(provider, call, self._configs[provider].base_url)
        try:
            result = await answer
        except ProviderError as exc:
            tracing.model_answered(span, exc)
            raise
        except BaseException as exc:
            tracing.model_answered(span, ProviderError(Code.INTERNAL, type(exc).__name__))
            raise
        tracing.model_answered(span, result)
        return result

    async def aclose(self) -> None:
        """Close every provider's connections; in the loop that used them."""
        with self._lock:
            built, self._built = list(self._built.values()), {}
        for provider in built:
            await provider.aclose()


def _call(model: V1Model, messages: list[ChatMessage], response_format: JsonSchemaFormat | None = None) -> ModelCall:
    """What the provider of `model` is asked: its provider-side name, temperature, max tokens and key."""
    return ModelCall(
        model=model.provider_model,
        messages=messages,
        temperature=model.temperature,
        max_tokens=model.max_tokens,
        api_key=model.api_key,
        response_format=response_format,
    )

"""Call a model through the openai SDK against any OpenAI-compatible endpoint.

One `openai.AsyncOpenAI` client per provider, built when the worker starts
(`open`) and shared by every call of its event loop; the SDK's retries are off
(`retry.py` is the one loop). The raw HTTP body is decoded with msgspec into our
own Structs (`wire.py`), skipping the SDK's pydantic models.

Why asynchronous, over aiohttp: a worker keeps up to `--concurrency` calls in
flight, and most of a call's life is waiting for the model. With a blocking call
per thread, 512 threads spent a third of the worker's CPU handing the GIL to one
another, and one process reached 0.80 of what 512 slow calls allow
(docs/benchmarks.md). On one event loop there is nothing to hand over. The SDK's
aiohttp transport (`openai.DefaultAioHttpClient`, the `aiohttp` extra) costs
0.81 ms of CPU a call at 512 in flight, against 1.86 ms for its default httpx
transport and 0.99 ms for a blocking call per thread (measured on this machine).

The call goes through the client's public `post` (the SDK's way to reach any
endpoint) rather than `chat.completions.create`: the typed method spends about
270 µs of CPU a call walking its TypedDict annotations to transform parameters
that msgspec has already validated. Auth, base URL, timeouts and the mapping of
HTTP errors to `openai.APIStatusError` are the SDK's either way.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar

import httpx2
import msgspec
import openai
import structlog
from msgspec import Struct

from multillm.config import ProviderConfig, RetryConfig
from multillm.errors import Code, ProviderError
from multillm.metrics import WorkerMetrics
from multillm.providers.retry import call_with_retry
from multillm.providers.wire import Choice, Completion, Message, Usage, decode_completion, events
from multillm.schemas import ChatMessage, V1ChatCompletionMessage, V1Choice, V1Usage

log = structlog.get_logger(__name__)

# The SDK refuses to build a client without a key; endpoints that need none get this.
_NO_KEY: Final = "no-key"
_CHAT_PATH: Final = "/chat/completions"


class JsonSchemaFormat(Struct, frozen=True, kw_only=True):
    """An answer in JSON that `schema` describes (OpenAI's structured outputs, `strict`)."""

    name: str
    schema: dict[str, object]

    def body(self) -> dict[str, object]:
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema, "strict": True}}


class ModelCall(Struct, frozen=True, kw_only=True):
    """One chat completion to ask a provider for. `model` is the provider-side name (`echo`)."""

    model: str
    messages: list[ChatMessage]
    temperature: float | None = None
    max_tokens: int | None = None
    api_key: str | None = None
    response_format: JsonSchemaFormat | None = None

    def __repr__(self) -> str:
        # The key must never reach a log line or a traceback through repr().
        key = "'***'" if self.api_key else "None"
        return (
            f"ModelCall(model={self.model!r}, messages=<{len(self.messages)}>, "
            f"temperature={self.temperature!r}, max_tokens={self.max_tokens!r}, api_key={key})"
        )


class ModelResult(Struct, frozen=True, kw_only=True):
    """A completion and what it took: `attempts` tries and `latency_ms` of wall time, waits included."""

    external_id: str
    model: str
    choices: list[V1Choice]
    usage: V1Usage
    attempts: int
    latency_ms: float
    # Where the provider reports them: prompt tokens read from its cache, and completion tokens
    # spent on reasoning (both are parts of the totals in `usage`, as OpenAI counts them).
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    # A streamed call: from its start (retries included) to the first text of the try that answered.
    time_to_first_token_ms: float | None = None


T = TypeVar("T")


def _openai_message(message: ChatMessage) -> dict[str, object]:
    # Our Structs put camelCase on the wire; OpenAI's API wants snake_case.
    out: dict[str, object] = {"role": message.role}
    if message.content is not None:
        out["content"] = message.content
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls is not None:
        out["tool_calls"] = msgspec.to_builtins(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


class OpenAICompatProvider:
    """A `Provider` for one OpenAI-compatible endpoint; use it from one event loop.

    Args:
        name: the provider's name in model names (`mock` in `mock/echo`).
        config: endpoint, key and per-try timeout.
        retry: the retry policy of every call.
        metrics: where retries are counted (none when None).
        max_connections: connections kept open to the endpoint: the worker's concurrency.
    """

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        retry: RetryConfig,
        metrics: WorkerMetrics | None = None,
        max_connections: int = 100,
    ) -> None:
        self.name = name
        self._metrics = metrics
        self._config = config
        self._retry = retry
        self._key = config.configured_key()
        self._max_connections = max_connections
        self._client: openai.AsyncOpenAI | None = None

    def open(self) -> None:
        """Build the client now rather than at the first call (see `Providers.open`).

        Raises:
            Exception: what the SDK raised (an unusable base URL, a CA file that cannot be read).
        """
        self._shared_client()

    def _shared_client(self) -> openai.AsyncOpenAI:
        # Not in __init__: a worker builds only the clients it serves, and `Providers.has`
        # must not load a CA bundle. aiohttp's session itself comes with the first call, in its loop.
        if self._client is None:
            # Every connection kept alive: past the SDK's default of 100, each call beyond
            # it would open (and close) a connection of its own.
            limits = httpx2.Limits(
                max_connections=self._max_connections, max_keepalive_connections=self._max_connections
            )
            self._client = openai.AsyncOpenAI(
                api_key=self._key or _NO_KEY,
                base_url=self._config.base_url,
                timeout=self._config.timeout,
                max_retries=0,
                http_client=openai.DefaultAioHttpClient(limits=limits, timeout=self._config.timeout),
            )
        return self._client

    def _prepared(self, call: ModelCall) -> tuple[openai.AsyncOpenAI, dict[str, object], str]:
        """The client, request body and name of `call`.

        Raises:
            ProviderError: UNAUTHENTICATED, no key is configured or given.
        """
        describe = f"{self.name}/{call.model}"
        if not call.api_key and not self._key and self._config.api_key_env:
            raise ProviderError(
                Code.UNAUTHENTICATED,
                f"{describe}: no api key: the environment variable {self._config.api_key_env} is not set"
                " and the request has no apiKey",
            )
        client = self._shared_client()
        if call.api_key:
            # with_options shares the connection pool; only the Authorization header differs.
            client = client.with_options(api_key=call.api_key)
        body: dict[str, object] = {"model": call.model, "messages": [_openai_message(m) for m in call.messages]}
        if call.temperature is not None:
            body["temperature"] = call.temperature
        if call.max_tokens is not None:
            body["max_tokens"] = call.max_tokens
        if call.response_format is not None:
            body["response_format"] = call.response_format.body()
        return client, body, describe

    async def _with_retry(
        self, call: ModelCall, describe: str, attempt: Callable[[float], Awaitable[T]]
    ) -> tuple[T, int, float]:
        return await call_with_retry(
            attempt,
            self._retry,
            timeout=self._config.timeout,
            describe=describe,
            secrets=(call.api_key, self._key),
            on_retry=functools.partial(self._metrics.retried, describe) if self._metrics else None,
        )

    async def complete(self, call: ModelCall) -> ModelResult:
        """Ask for one chat completion, retrying brief faults.

        Raises:
            ProviderError: the call failed for good; its message holds no api key.
        """
        client, body, describe = self._prepared(call)

        async def attempt(timeout: float) -> Completion:
            return decode_completion(
                await client.post(_CHAT_PATH, cast_to=bytes, body=body, options={"timeout": timeout})
            )

        completion, attempts, latency_ms = await self._with_retry(call, describe, attempt)
        log.debug("provider.call", model=describe, attempts=attempts, latency_ms=round(latency_ms, 1))
        return _result(completion, call, attempts, latency_ms)

    async def stream(self, call: ModelCall, listener: StreamListener) -> ModelResult:
        """Ask for one chat completion as it is generated (the SDK's streaming API), telling `listener`
        each text delta of the first choice; retrying brief faults, a stream cut midway among them,
        each try from the start (`listener.started`). Tool calls come whole in the result only.

        Raises:
            ProviderError: the call failed for good; its message holds no api key.
        """
        client, body, describe = self._prepared(call)
        started = time.monotonic()
        first_token: list[float] = []  # of the try that answered

        async def attempt(timeout: float) -> Completion:
            first_token.clear()
            listener.started()
            parts: list[str] = []
            answer = Completion()
            finish: str | None = None
            # The SDK's own streaming response (auth, timeouts, HTTP errors as `openai.APIStatusError`),
            # read as lines and decoded with msgspec: its typed stream builds a pydantic model per token.
            async with client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
                **body, stream=True, stream_options={"include_usage": True}, timeout=timeout
            ) as response:
                async for chunk in events(response.iter_lines(), response.http_request):
                    answer.id, answer.model = answer.id or chunk.id, answer.model or chunk.model
                    if chunk.usage is not None:
                        answer.usage = chunk.usage
                    for choice in chunk.choices[:1]:
                        if text := choice.delta.content:
                            if not first_token:
                                first_token.append(time.monotonic())
                            parts.append(text)
                            listener.delta(text)
                        finish = choice.finish_reason or finish
            answer.choices = [Choice(message=Message(content="".join(parts)), finish_reason=finish)]
            return answer

        completion, attempts, latency_ms = await self._with_retry(call, describe, attempt)
        time_to_first_token_ms = (first_token[0] - started) * 1000 if first_token else None
        log.debug("provider.stream", model=describe, attempts=attempts, latency_ms=round(latency_ms, 1))
        return _result(completion, call, attempts, latency_ms, time_to_first_token_ms)

    async def aclose(self) -> None:
        """Close the client's connections; in the loop that used it."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class StreamListener(Protocol):
    """Told of a streamed completion as it comes, on the caller's event loop; must not block."""

    def started(self) -> None:
        """A try begins: whatever earlier tries delivered is void."""
        ...

    def delta(self, text: str) -> None:
        """The next piece of the first choice's text."""
        ...


def _result(
    completion: Completion,
    call: ModelCall,
    attempts: int,
    latency_ms: float,
    time_to_first_token_ms: float | None = None,
) -> ModelResult:
    usage = completion.usage or Usage()
    return ModelResult(
        external_id=completion.id,
        model=completion.model or call.model,
        choices=[
            V1Choice(
                index=c.index,
                message=V1ChatCompletionMessage(
                    role=c.message.role, content=c.message.content, tool_calls=c.message.tool_calls
                ),
                finish_reason=c.finish_reason,
            )
            for c in completion.choices
        ],
        usage=V1Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        ),
        attempts=attempts,
        latency_ms=latency_ms,
        cached_tokens=usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else None,
        reasoning_tokens=(
            usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else None
        ),
        time_to_first_token_ms=time_to_first_token_ms,
    )

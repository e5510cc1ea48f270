"""Providers over real HTTP: the openai SDK against the mock server, with faults injected through it."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import httpx2
import openai
import pytest

from multillm.config import ProviderConfig, RetryConfig
from multillm.errors import Code
from multillm.mock_llm import MockControl, MockLLM
from multillm.providers import ModelCall, ModelResult, OpenAICompatProvider, Provider, ProviderError, Providers
from multillm.providers.retry import retry_after
from multillm.schemas import ChatMessage, ToolCall, ToolCallFunction, V1Model

CONFIGURED_KEY = "sk-configured-0123456789abcdef"
REQUEST_KEY = "sk-request-fedcba9876543210"
FAST = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=0.05, budget_seconds=10)
HELLO = [ChatMessage(role="user", content="hello big world")]
T = TypeVar("T")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class LoopThread:
    """An event loop on a thread of its own: the tests call into it from theirs, as a worker's tasks would run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class BlockingProviders:
    """`Providers` on a worker's event loop, called from the test's threads as a worker's tasks would be."""

    def __init__(self, providers: Providers, calls: LoopThread) -> None:
        self.providers = providers
        self._calls = calls

    def complete(self, model: V1Model, messages: list[ChatMessage]) -> ModelResult:
        return self._calls.run(self.providers.complete(model, messages), timeout=30)

    def stream(self, model: V1Model, messages: list[ChatMessage], listener: Heard) -> ModelResult:
        return self._calls.run(self.providers.stream(model, messages, listener), timeout=30)

    def has(self, name: str) -> bool:
        return self.providers.has(name)

    def get(self, name: str) -> Provider:
        return self.providers.get(name)


class Heard:
    """A StreamListener that writes down what it is told: a list of deltas per try."""

    def __init__(self) -> None:
        self.tries: list[list[str]] = []

    def started(self) -> None:
        self.tries.append([])

    def delta(self, text: str) -> None:
        self.tries[-1].append(text)


MakeProviders = Callable[..., BlockingProviders]


@pytest.fixture
def calls() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.stop()


@pytest.fixture
def make_providers(mock_llm: MockLLM, mock_control: MockControl, calls: LoopThread) -> Iterator[MakeProviders]:
    built: list[Providers] = []

    def make(retry: RetryConfig = FAST, timeout: float = 5.0, **config: str) -> BlockingProviders:
        settings = config or {"api_key": CONFIGURED_KEY}
        providers = Providers({"mock": ProviderConfig(base_url=mock_llm.url, timeout=timeout, **settings)}, retry)
        built.append(providers)
        return BlockingProviders(providers, calls)

    yield make
    for providers in built:
        calls.run(providers.aclose(), timeout=5)


def fail(providers: BlockingProviders, model: V1Model, messages: list[ChatMessage] = HELLO) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        providers.complete(model, messages)
    return info.value


def test_completion_and_external_id(make_providers: MakeProviders, mock_control: MockControl) -> None:
    result = make_providers().complete(V1Model(name="mock/echo"), HELLO)
    assert result.model == "echo"
    assert result.attempts == 1
    assert result.latency_ms > 0
    assert [c.message.content for c in result.choices] == ["echo says: hello big world"]
    assert result.choices[0].finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        3,
        5,
        8,
    )
    assert result.external_id.startswith("chatcmpl-")
    [call] = mock_control.calls()
    assert call.id == result.external_id
    assert call.prompt == "hello big world"


def test_temperature_and_max_tokens_are_sent(make_providers: MakeProviders) -> None:
    result = make_providers().complete(V1Model(name="mock/reverse", temperature=0.2, max_tokens=3), HELLO)
    assert result.choices[0].message.content == "reverse says: world"
    assert result.choices[0].finish_reason == "length"


def test_conversation_with_tool_calls(make_providers: MakeProviders, mock_control: MockControl) -> None:
    call = ToolCall(id="call_1", function=ToolCallFunction(name="lookup", arguments='{"q": "x"}'))
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="look it up"),
        ChatMessage(role="assistant", tool_calls=[call]),
        ChatMessage(role="tool", tool_call_id="call_1", content="found"),
        ChatMessage(role="user", content=[{"type": "text", "text": "and now?"}]),
    ]
    result = make_providers().complete(V1Model(name="mock/echo"), messages)
    assert result.choices[0].message.content == "echo says: and now?"


def test_configured_key_is_sent(make_providers: MakeProviders, mock_control: MockControl) -> None:
    make_providers().complete(V1Model(name="mock/echo"), HELLO)
    assert mock_control.calls()[0].auth_sha256 == sha(CONFIGURED_KEY)


def test_request_key_wins(make_providers: MakeProviders, mock_control: MockControl) -> None:
    providers = make_providers()
    providers.complete(V1Model(name="mock/echo", api_key=REQUEST_KEY), HELLO)
    providers.complete(V1Model(name="mock/echo"), HELLO)  # the per-request key did not stick
    assert [c.auth_sha256 for c in mock_control.calls()] == [sha(REQUEST_KEY), sha(CONFIGURED_KEY)]


def test_key_from_environment(
    make_providers: MakeProviders, mock_control: MockControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MULTILLM_TEST_KEY", "sk-from-env")
    make_providers(api_key_env="MULTILLM_TEST_KEY").complete(V1Model(name="mock/echo"), HELLO)
    assert mock_control.calls()[0].auth_sha256 == sha("sk-from-env")


def test_missing_env_key_is_unauthenticated(
    make_providers: MakeProviders, mock_control: MockControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MULTILLM_TEST_KEY", raising=False)
    providers = make_providers(api_key_env="MULTILLM_TEST_KEY")
    error = fail(providers, V1Model(name="mock/echo"))
    assert error.code == Code.UNAUTHENTICATED
    assert "MULTILLM_TEST_KEY" in error.message
    assert error.attempts == 0
    assert mock_control.calls() == []
    # A per-request key is enough on its own.
    providers.complete(V1Model(name="mock/echo", api_key=REQUEST_KEY), HELLO)
    assert mock_control.calls()[0].auth_sha256 == sha(REQUEST_KEY)


def test_unknown_provider_is_invalid_argument(make_providers: MakeProviders) -> None:
    providers = make_providers()
    assert providers.has("mock")
    assert not providers.has("nope")
    error = fail(providers, V1Model(name="nope/echo"))
    assert error.code == Code.INVALID_ARGUMENT
    assert "'nope'" in error.message
    assert not error.retryable


def test_provider_is_built_once(make_providers: MakeProviders) -> None:
    providers = make_providers()
    with ThreadPoolExecutor(8) as pool:
        built = list(pool.map(lambda _: providers.get("mock"), range(32)))
    assert all(p is built[0] for p in built)


@pytest.mark.parametrize("status", [200, 400, 503])
def test_a_call_leaves_no_reference_cycles(
    make_providers: MakeProviders, mock_control: MockControl, status: int
) -> None:
    # Garbage in cycles waits for the cyclic GC, whose older generations then stop the worker's
    # loop for a second at a time; a call must free everything it made on return, failed or not.
    providers = make_providers()
    providers.complete(V1Model(name="mock/echo"), HELLO)  # the client, its pool, the first connection
    if status != 200:
        mock_control.set_fault("echo", always=status)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            try:
                providers.complete(V1Model(name="mock/echo"), HELLO)
            except ProviderError as exc:
                assert status != 200, exc
        gc.collect()
        garbage = [f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not [name for name in garbage if name.startswith(("tenacity", "openai", "multillm", "aiohttp"))], garbage
    assert len(garbage) < 20, garbage  # less than one object a call, from anything


def test_429_twice_then_ok(make_providers: MakeProviders, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", statuses=[429, 429], retry_after=0.01)
    result = make_providers().complete(V1Model(name="mock/echo"), HELLO)
    assert result.attempts == 3
    assert [c.status for c in mock_control.calls()] == [429, 429, 200]
    assert result.external_id == mock_control.calls()[-1].id


def test_always_503_is_unavailable_after_max_attempts(make_providers: MakeProviders, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", always=503)
    started = time.monotonic()
    error = fail(make_providers(), V1Model(name="mock/echo"))
    elapsed = time.monotonic() - started
    assert error.code == Code.UNAVAILABLE
    assert error.retryable
    assert error.attempts == FAST.max_attempts == len(mock_control.calls())
    assert elapsed < FAST.budget_seconds
    assert 0 < error.latency_ms <= elapsed * 1000
    assert "503" in error.message


def test_budget_stops_retries_early(make_providers: MakeProviders, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", always=503, retry_after=0.1)
    policy = RetryConfig(max_attempts=20, initial_wait=0.01, max_wait=1.0, budget_seconds=0.35)
    providers = make_providers(retry=policy)
    providers.get("mock")  # built outside the timed call
    started = time.monotonic()
    error = fail(providers, V1Model(name="mock/echo"))
    elapsed = time.monotonic() - started
    assert error.code == Code.UNAVAILABLE
    assert error.latency_ms < policy.budget_seconds * 1000
    assert elapsed < policy.budget_seconds
    assert 2 <= error.attempts <= 4  # ~0.1 s apart, and no wait may end past the budget


def test_always_429_is_resource_exhausted(make_providers: MakeProviders, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", always=429, retry_after=0.01)
    error = fail(make_providers(), V1Model(name="mock/echo"))
    assert error.code == Code.RESOURCE_EXHAUSTED
    assert error.attempts == FAST.max_attempts
    assert error.retryable


@pytest.mark.parametrize(
    ("status", "code", "attempts"),
    [
        (400, Code.INVALID_ARGUMENT, 1),
        (404, Code.INVALID_ARGUMENT, 1),
        (422, Code.INVALID_ARGUMENT, 1),
        (401, Code.UNAUTHENTICATED, 1),
        (403, Code.PERMISSION_DENIED, 1),
        (408, Code.UNAVAILABLE, 3),
        (409, Code.UNAVAILABLE, 3),
        (500, Code.UNAVAILABLE, 3),
        (502, Code.UNAVAILABLE, 3),
    ],
)
def test_status_mapping(
    make_providers: MakeProviders, mock_control: MockControl, status: int, code: Code, attempts: int
) -> None:
    mock_control.set_fault("echo", always=status)
    error = fail(make_providers(), V1Model(name="mock/echo"))
    assert (error.code, error.attempts) == (code, attempts)
    assert len(mock_control.calls()) == attempts


def test_dropped_connection_is_retried(make_providers: MakeProviders, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", drop_connection=True)
    result = make_providers().complete(V1Model(name="mock/echo"), HELLO)
    assert result.attempts == 2
    assert [c.status for c in mock_control.calls()] == [0, 200]


def test_read_timeout_is_retried_then_unavailable(make_providers: MakeProviders, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", latency_ms=600)
    started = time.monotonic()
    error = fail(make_providers(timeout=0.2), V1Model(name="mock/echo"))
    assert error.code == Code.UNAVAILABLE
    assert error.attempts == FAST.max_attempts
    assert "timed out" in error.message
    assert time.monotonic() - started < 0.6 * FAST.max_attempts


@pytest.mark.parametrize("header", ["retry_after_ms", "retry_after"])
def test_retry_after_is_honoured(make_providers: MakeProviders, mock_control: MockControl, header: str) -> None:
    if header == "retry_after_ms":
        mock_control.set_fault("echo", statuses=[429], retry_after_ms=300)
    else:
        mock_control.set_fault("echo", statuses=[503], retry_after=0.3)
    policy = RetryConfig(max_attempts=3, initial_wait=0.01, max_wait=2.0, budget_seconds=10)
    started = time.monotonic()
    result = make_providers(retry=policy).complete(V1Model(name="mock/echo"), HELLO)
    assert result.attempts == 2
    assert time.monotonic() - started >= 0.3


def test_retry_after_is_capped_at_max_wait(make_providers: MakeProviders, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", statuses=[429], retry_after=30)
    started = time.monotonic()
    assert make_providers().complete(V1Model(name="mock/echo"), HELLO).attempts == 2
    assert time.monotonic() - started < 5


def test_retry_after_header_forms() -> None:
    def error(**headers: str) -> openai.APIStatusError:
        request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
        response = httpx2.Response(429, headers=headers, request=request)
        return openai.RateLimitError("Error code: 429", response=response, body=None)

    assert retry_after(error(**{"retry-after-ms": "250"})) == 0.25
    assert retry_after(error(**{"retry-after": "2"})) == 2.0
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < (retry_after(error(**{"retry-after": when})) or 0) <= 30
    assert retry_after(error(**{"retry-after": "soon"})) is None
    assert retry_after(error()) is None
    assert retry_after(ValueError()) is None


@pytest.mark.parametrize("use_request_key", [True, False])
def test_key_never_in_error(make_providers: MakeProviders, mock_control: MockControl, use_request_key: bool) -> None:
    mock_control.set_fault("echo", always=401, echo_auth=True)
    key = REQUEST_KEY if use_request_key else CONFIGURED_KEY
    error = fail(make_providers(), V1Model(name="mock/echo", api_key=REQUEST_KEY if use_request_key else None))
    assert error.code == Code.UNAUTHENTICATED
    assert "Incorrect API key provided" in error.message  # the provider's text is kept, minus the key
    for text in (error.message, str(error), repr(error), repr(error.args)):
        assert key not in text
    assert error.__cause__ is None
    assert error.__context__ is None


def test_model_call_repr_hides_key() -> None:
    call = ModelCall(model="echo", messages=HELLO, api_key=REQUEST_KEY)
    assert REQUEST_KEY not in repr(call)
    assert "***" in repr(call)


def test_error_to_status() -> None:
    status = ProviderError(Code.UNAVAILABLE, "down", attempts=3, latency_ms=12.5).to_status()
    assert (status.code, status.message) == (14, "down")


class _Garbage(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b'{"id": 42, "choices": "nope"}'

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = self.body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _HugeUsage(_Garbage):
    # A token count no sink's integer column could hold: the record must still be storable.
    body = b'{"id": "c", "choices": [], "usage": {"prompt_tokens": 9223372036854775808}}'


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (_Garbage, "Expected `str`, got `int` - at `$.id`"),
        (_HugeUsage, "Expected `int` <= 9223372036854775807 - at `$.usage.prompt_tokens`"),
    ],
)
def test_undecodable_200_is_internal_and_not_retried(calls: LoopThread, handler: type[_Garbage], expected: str) -> None:
    with odd_provider(calls, handler) as provider:
        with pytest.raises(ProviderError) as info:
            calls.run(provider.complete(ModelCall(model="x", messages=HELLO)), timeout=30)
        assert info.value.code == Code.INTERNAL
        assert info.value.attempts == 1
        assert expected in info.value.message


@contextmanager
def odd_provider(calls: LoopThread, handler: type[BaseHTTPRequestHandler]) -> Iterator[OpenAICompatProvider]:
    """A provider whose endpoint is a server of `handler`'s, answering as it does; both closed afterwards."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = ProviderConfig(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="sk-odd-1234")
        provider = OpenAICompatProvider("odd", config, FAST)
        yield provider
        calls.run(provider.aclose(), timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_calls(make_providers: MakeProviders, mock_control: MockControl) -> None:
    providers = make_providers()
    mock_control.set_fault("echo", statuses=[429, 503, 429], retry_after=0.01)

    def one(i: int) -> tuple[int, str]:
        prompt = [ChatMessage(role="user", content=f"call {i}")]
        result = providers.complete(V1Model(name="mock/echo", api_key=f"sk-thread-{i}"), prompt)
        assert result.choices[0].message.content == f"echo says: call {i}"
        return i, result.external_id

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    ids = {external_id for _, external_id in results}
    assert len(ids) == 64
    ok = [c for c in mock_control.calls() if c.status == 200]
    assert len(ok) == 64
    # Each call went out with its own thread's key.
    for c in ok:
        i = int((c.prompt or "").split()[1])
        assert c.auth_sha256 == sha(f"sk-thread-{i}")


def test_a_malformed_http_answer_is_retried_then_unavailable(calls: LoopThread) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    answered = 0

    def serve() -> None:
        nonlocal answered
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                # Counted before answering: once the client has its last answer it may finish (and
                # the test read the count) before this thread runs again.
                answered += 1
                conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        config = ProviderConfig(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1", api_key=CONFIGURED_KEY)
        provider = OpenAICompatProvider("odd", config, FAST)
        with pytest.raises(ProviderError) as info:
            calls.run(provider.complete(ModelCall(model="x", messages=HELLO)), timeout=30)
        assert info.value.code == Code.UNAVAILABLE
        assert info.value.attempts == FAST.max_attempts == answered
        assert CONFIGURED_KEY not in str(info.value)
        calls.run(provider.aclose(), timeout=5)
    finally:
        listener.close()


def test_nothing_listening_names_the_host_and_port_not_a_timeout(calls: LoopThread) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The configured key in the URL's path too: only the host and port may be quoted.
    config = ProviderConfig(base_url=f"http://127.0.0.1:{port}/{CONFIGURED_KEY}/v1", api_key=CONFIGURED_KEY)
    providers = Providers({"down": config}, FAST)
    try:
        with pytest.raises(ProviderError) as info:
            calls.run(providers.complete(V1Model(name="down/m", api_key=REQUEST_KEY), HELLO))
    finally:
        calls.run(providers.aclose(), timeout=5)
    error = info.value
    assert error.code == Code.UNAVAILABLE and error.attempts == FAST.max_attempts
    assert f"down/m: cannot connect to host 127.0.0.1:{port} (ConnectionRefusedError: " in error.message
    assert "timed out" not in error.message
    assert CONFIGURED_KEY not in error.message and REQUEST_KEY not in error.message


def test_a_streamed_call_tells_each_delta_and_returns_the_whole(
    make_providers: MakeProviders, mock_control: MockControl
) -> None:
    heard = Heard()
    result = make_providers().stream(V1Model(name="mock/upper"), HELLO, heard)
    whole = make_providers().complete(V1Model(name="mock/upper"), HELLO)
    assert heard.tries == [["upper ", "says: ", "HELLO ", "BIG ", "WORLD"]]
    assert result.choices[0].message.content == whole.choices[0].message.content
    assert result.choices[0].finish_reason == "stop"
    assert result.usage == whole.usage
    assert result.external_id == mock_control.calls()[0].id
    assert result.time_to_first_token_ms is not None and 0 < result.time_to_first_token_ms <= result.latency_ms


def test_a_stream_cut_midway_is_retried_from_the_start(
    make_providers: MakeProviders, mock_control: MockControl
) -> None:
    # The fault cuts every stream of `echo` after two words; the retry gets the same cut, so the
    # call fails for good after max_attempts, each try heard from its start.
    mock_control.set_fault("echo", cut_after_tokens=2)
    heard = Heard()
    with pytest.raises(ProviderError) as failed:
        make_providers().stream(V1Model(name="mock/echo"), HELLO, heard)
    assert failed.value.code == Code.UNAVAILABLE
    assert heard.tries == [["echo ", "says: "]] * FAST.max_attempts
    mock_control.set_fault("echo", statuses=[503])
    heard = Heard()
    result = make_providers().stream(V1Model(name="mock/echo"), HELLO, heard)
    assert heard.tries == [[], ["echo ", "says: ", "hello ", "big ", "world"]]
    assert result.attempts == 2


class _Events(_Garbage):
    """A streamed answer as some servers write it: comments, `event:` fields, one event's data over
    two lines, and no blank line after the last event."""

    body = (
        b": keep-alive\n\n"
        b'event: chunk\ndata: {"id": "c1", "model": "x", "choices": [{"delta": {"content": "Hel"}}]}\n\n'
        b'data: {"id": "c1", "choices": [{"delta": {"content": "lo"},\ndata:  "finish_reason": "stop"}]}\n\n'
        b'data: {"id": "c1", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}'
    )


class _ErrorEvent(_Garbage):
    body = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: {"error": {"message": "overloaded"}}\n\n'


class _NotChunks(_Garbage):
    body = b'data: {"choices": "nope"}\n\n'


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (_Events, "Hello"),
        (_ErrorEvent, "overloaded"),
        (_NotChunks, "the provider's stream is not chat completion chunks: Expected `array`, got `str`"),
    ],
)
def test_server_sent_events_as_servers_write_them(calls: LoopThread, handler: type[_Garbage], expected: str) -> None:
    with odd_provider(calls, handler) as provider:
        heard = Heard()
        try:
            result = calls.run(provider.stream(ModelCall(model="x", messages=HELLO), heard), timeout=30)
        except ProviderError as error:
            # Neither is retried: a server that says so, or speaks garbage, would most likely again.
            assert error.code == Code.INTERNAL and error.attempts == 1
            assert expected in error.message
        else:
            assert handler is _Events
            assert heard.tries == [["Hel", "lo"]]
            assert result.choices[0].message.content == expected and result.choices[0].finish_reason == "stop"
            assert (result.external_id, result.usage.total_tokens if result.usage else None) == ("c1", 3)

"""An OpenAI-compatible chat server for the demo and the tests, with faults driven over HTTP.

`POST /v1/chat/completions` answers deterministically: the text depends only on the
model and the messages, so runs can be compared. Faults are set per model (the
provider-side name, `echo` for `mock/echo`, or `*` for every model without its own)
through `/_mock/faults`, so a test can drive a mock that runs in another process;
`/_mock/calls` lists what was served. Status 0 in a fault means "close the socket
without answering".

Threads: one serves the listening socket; each connection gets a daemon thread
(`ThreadingHTTPServer`). The fault table and the call log are shared by all of them
under one lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import socket
import struct
import threading
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Sequence
from http.client import responses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Final, cast

import msgspec
import structlog
from msgspec import Meta, Struct

from multillm.config import DEFAULT_MOCK_PORT

log = structlog.get_logger(__name__)

DROP: Final = 0
_MAX_CALLS: Final = 100_000
Status = Annotated[int, Meta(ge=0, le=599)]


# --- the control protocol ----------------------------------------------------


class Fault(Struct, kw_only=True, forbid_unknown_fields=True):
    """What `POST /_mock/faults` takes: how the next calls of one model are answered.

    `statuses` are answered in order, then `always` for ever (or normal answers); a
    status is 0 (close the socket without answering) or an HTTP status from 200 on.
    `drop_connection` puts one dropped connection before `statuses`. `retry_after`
    (seconds) and `retry_after_ms` become headers of the error answers; `latency_ms`
    replaces the server's latency for this model; `echo_auth` puts the caller's bearer
    token in error messages (to test that it gets scrubbed). `error_rate` makes each
    call after those fail at random, with one of `error_statuses` (0 = drop), from a
    generator seeded with `seed` (for chaos runs). Setting a model's fault replaces the
    one it had.
    """

    model: str
    statuses: list[Status] = msgspec.field(default_factory=list)
    always: Status | None = None
    retry_after: Annotated[float, Meta(ge=0)] | None = None
    retry_after_ms: Annotated[int, Meta(ge=0)] | None = None
    latency_ms: Annotated[float, Meta(ge=0)] | None = None
    drop_connection: bool = False
    echo_auth: bool = False
    error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.0
    error_statuses: list[Status] = msgspec.field(default_factory=lambda: [500])
    seed: int = 0


class MockCall(Struct, kw_only=True):
    """One call the mock served, as `GET /_mock/calls` lists it (the last 100,000).

    `id` is the `chatcmpl-` id of a completion (None for errors), `status` 0 a dropped
    connection, `auth_sha256` the SHA-256 of the bearer token (never the token itself),
    `prompt` the last user message's text (None for an undecodable request).
    """

    id: str | None
    model: str | None
    status: int
    auth_sha256: str | None
    prompt: str | None


# --- OpenAI's wire, only the fields the mock reads or writes -------------------


class _Part(Struct):
    type: str = "text"
    text: str | None = None


class _InMessage(Struct):
    role: str
    content: str | list[_Part] | None = None


class _ChatRequest(Struct):
    model: str
    messages: Annotated[list[_InMessage], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None


class _OutMessage(Struct):
    content: str
    role: str = "assistant"


class _Choice(Struct):
    message: _OutMessage
    finish_reason: str
    index: int = 0


class _Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[_Choice]
    usage: _Usage
    object: str = "chat.completion"


class _ErrorDetail(Struct):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class _ErrorBody(Struct):
    error: _ErrorDetail


_encoder: Final = msgspec.json.Encoder()
_chat_decoder: Final = msgspec.json.Decoder(_ChatRequest)
_fault_decoder: Final = msgspec.json.Decoder(Fault)
_calls_decoder: Final = msgspec.json.Decoder(list[MockCall])

_ERROR_TYPES: Final = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_exceeded",
}


def _text(message: _InMessage) -> str:
    if isinstance(message.content, list):
        return " ".join(p.text for p in message.content if p.text)
    return message.content or ""


def _prompt(request: _ChatRequest) -> str:
    """The text of the last user message."""
    return next((_text(m) for m in reversed(request.messages) if m.role == "user"), "")


def _answer(request: _ChatRequest) -> tuple[str, str, _Usage]:
    """The deterministic content, finish reason and usage (tokens are whitespace words)."""
    words = _prompt(request).split()
    if request.model == "reverse":
        words.reverse()
    elif request.model == "upper":
        words = [w.upper() for w in words]
    out = [request.model, "says:", *words]
    limit = request.max_completion_tokens or request.max_tokens
    finish = "stop"
    if limit is not None and len(out) > limit:
        out, finish = out[:limit], "length"
    prompt_tokens = sum(len(_text(m).split()) for m in request.messages)
    return " ".join(out), finish, _Usage(prompt_tokens, len(out), prompt_tokens + len(out))


class _ModelFault:
    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.pending: deque[int] = deque(([DROP] if fault.drop_connection else []) + fault.statuses)
        self.random = random.Random(fault.seed)

    def next_status(self) -> int:
        fault = self.fault
        if self.pending:
            return self.pending.popleft()
        if fault.error_rate and self.random.random() < fault.error_rate:
            return self.random.choice(fault.error_statuses)
        return fault.always if fault.always is not None else 200


class _State:
    """Faults and the call log, shared by the connection threads."""

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self.lock = threading.Lock()
        self.faults: dict[str, _ModelFault] = {}
        # Bounded: a mock that serves a long benchmark must not grow without limit.
        self.calls: deque[MockCall] = deque(maxlen=_MAX_CALLS)

    def plan(self, model: str) -> tuple[int, float, Fault | None]:
        """The status (0 = drop) and latency of the next call of `model`."""
        with self.lock:
            entry = self.faults.get(model) or self.faults.get("*")
            if entry is None:
                return 200, self.latency_ms, None
            fault = entry.fault
            status = entry.next_status()
            latency = fault.latency_ms if fault.latency_ms is not None else self.latency_ms
            return status, latency, fault


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        super().__init__(address, _Handler)
        self.state = state
        self.open_connections: set[socket.socket] = set()

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that went away (timeouts, dropped faults) is routine here, not a traceback.
        log.debug("mock_llm.connection_error", client=str(client_address))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the client's delayed ACK
    # would add ~40 ms to every answer.
    disable_nagle_algorithm = True
    timeout = 120  # an idle keep-alive connection frees its thread eventually

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        super().setup()
        with self._server.state.lock:
            self._server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self._server.state.lock:
            self._server.open_connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: calls are logged once each, through structlog."""

    def _send(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (e.g. its timeout); nothing left to tell it
            self.close_connection = True

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _error(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self._send(status, _encoder.encode(_ErrorBody(_ErrorDetail(message, kind))), headers)

    def do_GET(self) -> None:
        if self.path == "/_mock/calls":
            with self._server.state.lock:
                body = _encoder.encode(list(self._server.state.calls))
            self._send(200, body)
        else:
            self._error(404, f"no route GET {self.path}")

    def do_DELETE(self) -> None:
        self._body()
        state = self._server.state
        with state.lock:
            if self.path == "/_mock/faults":
                state.faults.clear()
            elif self.path == "/_mock/calls":
                state.calls.clear()
            else:
                return self._error(404, f"no route DELETE {self.path}")
        self._send(200, b"{}")

    def do_POST(self) -> None:
        body = self._body()
        if self.path == "/v1/chat/completions":
            self._chat(body)
        elif self.path == "/_mock/faults":
            try:
                fault = _fault_decoder.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return self._error(400, f"invalid fault: {exc}")
            with self._server.state.lock:
                self._server.state.faults[fault.model] = _ModelFault(fault)
            self._send(200, b"{}")
        else:
            self._error(404, f"no route POST {self.path}")

    def _chat(self, body: bytes) -> None:
        auth = self.headers.get("Authorization") or ""
        token = auth.removeprefix("Bearer ").strip()
        auth_sha = hashlib.sha256(token.encode()).hexdigest() if token else None
        try:
            request = _chat_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._record(MockCall(id=None, model=None, status=400, auth_sha256=auth_sha, prompt=None))
            return self._error(400, f"invalid chat request: {exc}")
        status, latency_ms, fault = self._server.state.plan(request.model)
        content, finish, usage = _answer(request)
        prompt = _prompt(request)
        external_id = "chatcmpl-" + uuid.uuid4().hex if status == 200 else None
        self._record(MockCall(id=external_id, model=request.model, status=status, auth_sha256=auth_sha, prompt=prompt))
        if latency_ms:
            time.sleep(latency_ms / 1000)
        if status == DROP:
            self.close_connection = True
            # Linger 0 makes close() send a reset, like a peer that crashed.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif external_id is not None:
            completion = _Completion(
                id=external_id,
                created=int(time.time()),
                model=request.model,
                choices=[_Choice(message=_OutMessage(content=content), finish_reason=finish)],
                usage=usage,
            )
            self._send(200, _encoder.encode(completion))
        else:
            assert fault is not None  # only a fault answers anything but 200
            headers: list[tuple[str, str]] = []
            if fault.retry_after is not None:
                headers.append(("Retry-After", f"{fault.retry_after:g}"))
            if fault.retry_after_ms is not None:
                headers.append(("retry-after-ms", str(fault.retry_after_ms)))
            message = f"mock fault: {status} {responses.get(status, 'Error')}"
            if fault.echo_auth:
                message = f"Incorrect API key provided: {token}"
            self._error(status, message, headers)

    def _record(self, call: MockCall) -> None:
        with self._server.state.lock:
            self._server.state.calls.append(call)
        log.debug("mock_llm.call", model=call.model, status=call.status, id=call.id)


# --- running it --------------------------------------------------------------


class MockLLM:
    """The server, run in a background thread (`start`) or in the caller's (`serve_forever`).

    Example:
        with MockLLM(latency_ms=5) as mock:
            client = openai.OpenAI(base_url=mock.url, api_key="unused")
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0) -> None:
        self._server = _Server((host, port), _State(latency_ms))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the OpenAI-compatible API, ending in `/v1`."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def control(self) -> MockControl:
        """A control client for this server."""
        return MockControl(self.url)

    def start(self) -> MockLLM:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="mock-llm", daemon=True)
        self._thread.start()
        log.debug("mock_llm.started", url=self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until `stop()` is called from another thread."""
        self._server.serve_forever(poll_interval=0.05)  # how soon stop() takes effect

    def stop(self) -> None:
        """Stop serving, reset open connections (waking their threads) and close the socket."""
        self._server.shutdown()
        with self._server.state.lock:
            connections = list(self._server.open_connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> MockLLM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class MockControl:
    """Drive a mock over HTTP (stdlib only), e.g. one that runs in another process.

    Args:
        base_url: the mock's URL, with or without the trailing `/v1`.
        timeout: seconds for each control request.
    """

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return cast(bytes, response.read())

    def set_fault(
        self,
        model: str,
        *,
        statuses: Sequence[int] = (),
        always: int | None = None,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        latency_ms: float | None = None,
        drop_connection: bool = False,
        echo_auth: bool = False,
        error_rate: float = 0.0,
        error_statuses: Sequence[int] = (500,),
        seed: int = 0,
    ) -> None:
        """Replace the fault of `model` (the provider-side name, or `*`); see `Fault`."""
        fault = Fault(
            model=model,
            statuses=list(statuses),
            always=always,
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
            latency_ms=latency_ms,
            drop_connection=drop_connection,
            echo_auth=echo_auth,
            error_rate=error_rate,
            error_statuses=list(error_statuses),
            seed=seed,
        )
        self._request("POST", "/_mock/faults", _encoder.encode(fault))

    def clear_faults(self) -> None:
        """Every model answers normally again."""
        self._request("DELETE", "/_mock/faults")

    def calls(self) -> list[MockCall]:
        """Every call served since the last `clear_calls()`, oldest first."""
        return _calls_decoder.decode(self._request("GET", "/_mock/calls"))

    def clear_calls(self) -> None:
        """Forget the calls served so far."""
        self._request("DELETE", "/_mock/calls")

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the mock answers, e.g. after starting it in another process.

        Raises:
            TimeoutError: it did not answer within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.calls()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mock LLM at {self.base_url} not ready after {timeout}s") from None
                time.sleep(0.05)


def main(host: str = "127.0.0.1", port: int = DEFAULT_MOCK_PORT, latency_ms: float = 0) -> None:
    """Run the mock until SIGINT or SIGTERM (`multillm mock-llm`).

    Args:
        host: address to bind.
        port: port to bind (0 picks a free one).
        latency_ms: delay before every answer, unless a fault sets another.
    """
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    mock = MockLLM(host, port, latency_ms).start()
    log.info("mock_llm.listening", url=mock.url, latency_ms=latency_ms)
    # Signals reach only the main thread, so it waits here while another serves.
    while not stopping.wait(0.5):
        pass
    mock.stop()
    log.info("mock_llm.stopped")

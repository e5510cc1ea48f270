"""The mock's HTTP server: the fault table, the call log, the request handler, and running it."""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from http.client import responses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

import msgspec

from multillm.config import DEFAULT_MOCK_LATENCY_MS, DEFAULT_MOCK_PORT
from multillm.logging_setup import get_logger
from multillm.mock_llm.control import MockControl
from multillm.mock_llm.protocol import (
    _ERROR_TYPES,
    DROP,
    MAX_LOGGED_CALLS,
    Fault,
    MockCall,
    _answer,
    _chat_decoder,
    _ChatRequest,
    _Choice,
    _Chunk,
    _ChunkChoice,
    _Completion,
    _Delta,
    _encoder,
    _ErrorBody,
    _ErrorDetail,
    _fault_decoder,
    _OutMessage,
    _pieces,
    _prompt,
    _Usage,
)

log = get_logger(__name__)


class _ModelFault:
    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.pending: deque[int] = deque(([DROP] if fault.drop_connection else []) + fault.statuses)
        self.random = random.Random(fault.seed)
        self.cuts_left = fault.cut_streams

    def next_status(self) -> int:
        fault = self.fault
        if self.pending:
            return self.pending.popleft()
        if fault.error_rate and self.random.random() < fault.error_rate:
            return self.random.choice(fault.error_statuses)
        return fault.always if fault.always is not None else 200

    def next_cut(self) -> int | None:
        """After how many tokens the next streamed answer is cut, if it is."""
        if self.fault.cut_after_tokens is None or self.cuts_left == 0:
            return None
        if self.cuts_left is not None:
            self.cuts_left -= 1
        return self.fault.cut_after_tokens


class _State:
    """Faults and the call log, shared by the connection threads."""

    def __init__(self, latency_ms: float, token_delay_ms: float = 0.0) -> None:
        self.latency_ms = latency_ms
        self.token_delay_ms = token_delay_ms
        self.lock = threading.Lock()
        self.faults: dict[str, _ModelFault] = {}
        # Bounded: a mock that serves a long benchmark must not grow without limit.
        self.calls: deque[MockCall] = deque(maxlen=MAX_LOGGED_CALLS)

    def plan(self, model: str, stream: bool) -> tuple[int, float, Fault | None, int | None]:
        """The status (0 = drop) and latency of the next call of `model`, and after how many tokens
        its stream is cut (None: not cut)."""
        with self.lock:
            entry = self.faults.get(model) or self.faults.get("*")
            if entry is None:
                return 200, self.latency_ms, None, None
            fault = entry.fault
            status = entry.next_status()
            latency = fault.latency_ms if fault.latency_ms is not None else self.latency_ms
            cut = entry.next_cut() if stream and status == 200 else None
            return status, latency, fault, cut


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connects when hundreds of calls start
    # at once, and a dropped SYN is retried only after a second.
    request_queue_size = 1024

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
        status, latency_ms, fault, cut = self._server.state.plan(request.model, request.stream)
        content, finish, usage = _answer(request)
        prompt = _prompt(request)
        external_id = "chatcmpl-" + uuid.uuid4().hex if status == 200 else None
        self._record(MockCall(id=external_id, model=request.model, status=status, auth_sha256=auth_sha, prompt=prompt))
        if latency_ms:
            time.sleep(latency_ms / 1000)
        if status == DROP:
            self._reset()
        elif external_id is not None and request.stream:
            delay = fault.token_delay_ms if fault and fault.token_delay_ms is not None else None
            self._stream(request, external_id, (content, finish, usage), delay, cut)
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

    def _stream(
        self,
        request: _ChatRequest,
        external_id: str,
        answer: tuple[str, str, _Usage],
        token_delay_ms: float | None,
        cut_after: int | None,
    ) -> None:
        """The answer as server-sent events, a token each `token_delay_ms` apart, over chunked
        transfer encoding; reset after `cut_after` tokens when given, like a provider that died."""
        content, finish, usage = answer
        delay = (self._server.state.token_delay_ms if token_delay_ms is None else token_delay_ms) / 1000
        created = int(time.time())

        def event(choices: list[_ChunkChoice], usage: _Usage | None = None) -> bytes:
            chunk = _Chunk(id=external_id, created=created, model=request.model, choices=choices, usage=usage)
            return b"data: " + _encoder.encode(chunk) + b"\n\n"

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(event([_ChunkChoice(delta=_Delta(role="assistant", content=""))]))
            for sent, piece in enumerate(_pieces(content)):
                if cut_after is not None and sent >= cut_after:
                    self._reset()
                    return
                if delay:
                    time.sleep(delay)
                self._chunk(event([_ChunkChoice(delta=_Delta(content=piece))]))
            self._chunk(event([_ChunkChoice(delta=_Delta(), finish_reason=finish)]))
            if request.stream_options is not None and request.stream_options.include_usage:
                self._chunk(event([], usage))
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")  # the last chunk of the body
        except OSError:  # the client went away mid-stream
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _reset(self) -> None:
        """Close the connection with a reset (linger 0), as a peer that crashed."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

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

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0, token_delay_ms: float = 0
    ) -> None:
        self._server = _Server((host, port), _State(latency_ms, token_delay_ms))
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


def main(
    host: str = "127.0.0.1",
    port: int = DEFAULT_MOCK_PORT,
    latency_ms: float = DEFAULT_MOCK_LATENCY_MS,
    token_delay_ms: float = 0.0,
) -> None:
    """Run the mock until SIGINT or SIGTERM (`multillm mock-llm`).

    Args:
        host: address to bind.
        port: port to bind (0 picks a free one).
        latency_ms: delay before every answer, unless a fault sets another.
        token_delay_ms: delay before each token of a streamed answer, unless a fault sets another.
    """
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    mock = MockLLM(host, port, latency_ms, token_delay_ms).start()
    log.info("mock_llm.listening", url=mock.url, latency_ms=latency_ms, token_delay_ms=token_delay_ms)
    # Signals reach only the main thread, so it waits here while another serves.
    while not stopping.wait(0.5):
        pass
    mock.stop()
    log.info("mock_llm.stopped")

"""The mock OpenAI server, over real HTTP: answers, faults, the call log, and the CLI entry point."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from multillm.mock_llm import MockControl, MockLLM


class Client:
    """One keep-alive HTTP/1.1 connection to the mock_llm."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)

    def post(
        self, path: str, body: bytes | object, token: str | None = "tok"
    ) -> tuple[int, dict[str, str], dict[str, object]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.conn.request("POST", path, raw, headers)
        response = self.conn.getresponse()
        data = json.loads(response.read())
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def chat(
        self, model: str, prompt: str, token: str = "tok", **extra: object
    ) -> tuple[int, dict[str, str], dict[str, object]]:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
        return self.post("/v1/chat/completions", body, token=token)


@pytest.fixture
def client(mock_llm: MockLLM) -> Iterator[Client]:
    c = Client(mock_llm.url)
    yield c
    c.conn.close()


def test_url_ends_in_v1(mock_llm: MockLLM) -> None:
    assert mock_llm.url.startswith("http://127.0.0.1:")
    assert mock_llm.url.endswith("/v1")


def test_completion_is_deterministic_and_recorded(client: Client, mock_control: MockControl) -> None:
    status, headers, first = client.chat("echo", "hello big world")
    _, _, second = client.chat("echo", "hello big world")  # same keep-alive connection
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert first["object"] == "chat.completion"
    assert first["model"] == "echo"
    choices = first["choices"]
    assert isinstance(choices, list)
    assert choices[0]["message"] == {"role": "assistant", "content": "echo says: hello big world"}
    assert choices[0]["finish_reason"] == "stop"
    assert first["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert second["choices"] == first["choices"]
    assert str(first["id"]).startswith("chatcmpl-")
    assert first["id"] != second["id"]
    calls = mock_control.calls()
    assert [c.id for c in calls] == [first["id"], second["id"]]
    assert calls[0].model == "echo"
    assert calls[0].status == 200
    assert calls[0].prompt == "hello big world"
    assert calls[0].auth_sha256 == hashlib.sha256(b"tok").hexdigest()


def test_models_answer_differently(client: Client) -> None:
    texts = set()
    for model in ("echo", "reverse", "upper", "gpt-x"):
        _, _, body = client.chat(model, "one two three")
        choices = body["choices"]
        assert isinstance(choices, list)
        texts.add(choices[0]["message"]["content"])
    assert texts == {
        "echo says: one two three",
        "reverse says: three two one",
        "upper says: ONE TWO THREE",
        "gpt-x says: one two three",
    }


def test_content_parts_and_last_user_message(client: Client, mock_control: MockControl) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "one"}]},
    ]
    status, _, body = client.post("/v1/chat/completions", {"model": "echo", "messages": messages})
    assert status == 200
    assert body["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 4,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 6},  # the messages before the last
    }
    assert mock_control.calls()[0].prompt == "second one"


def test_max_tokens_truncates_words(client: Client) -> None:
    _, _, body = client.chat("echo", "a b c d e f", max_tokens=4)
    choices = body["choices"]
    assert isinstance(choices, list)
    assert choices[0]["message"]["content"] == "echo says: a b"
    assert choices[0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"", json.dumps({"model": "echo"}).encode(), json.dumps({"messages": []}).encode()],
)
def test_bad_request_is_400(client: Client, mock_control: MockControl, body: bytes) -> None:
    status, _, data = client.post("/v1/chat/completions", body)
    assert status == 400
    error = data["error"]
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert mock_control.calls()[0].status == 400


def test_fault_statuses_in_order_then_normal(client: Client, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", statuses=[429, 503], retry_after=0.05, retry_after_ms=50)
    status, headers, body = client.chat("echo", "hi")
    assert status == 429
    assert headers["retry-after"] == "0.05"
    assert headers["retry-after-ms"] == "50"
    error = body["error"]
    assert isinstance(error, dict)
    assert error["type"] == "rate_limit_exceeded"
    assert client.chat("echo", "hi")[0] == 503
    assert client.chat("other", "hi")[0] == 200  # faults are per model
    assert client.chat("echo", "hi")[0] == 200
    assert [c.status for c in mock_control.calls()] == [429, 503, 200, 200]
    assert [c.id is None for c in mock_control.calls()] == [True, True, False, False]


def test_fault_always_and_clear(client: Client, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", always=500)
    assert [client.chat("echo", "hi")[0] for _ in range(3)] == [500, 500, 500]
    mock_control.clear_faults()
    assert client.chat("echo", "hi")[0] == 200


def test_wildcard_fault(client: Client, mock_control: MockControl) -> None:
    mock_control.set_fault("*", always=503)
    mock_control.set_fault("echo", statuses=[])
    assert client.chat("anything", "hi")[0] == 503
    assert client.chat("echo", "hi")[0] == 200


def test_echo_auth_puts_the_token_in_the_error(client: Client, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", always=401, echo_auth=True)
    status, _, body = client.chat("echo", "hi", token="sk-visible")
    assert status == 401
    assert body == {
        "error": {
            "message": "Incorrect API key provided: sk-visible",
            "type": "authentication_error",
            "code": None,
            "param": None,
        }
    }


def test_drop_connection_answers_nothing(mock_llm: MockLLM, client: Client, mock_control: MockControl) -> None:
    mock_control.set_fault("echo", drop_connection=True)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        client.chat("echo", "hi")
    fresh = Client(mock_llm.url)
    assert fresh.chat("echo", "hi")[0] == 200
    fresh.conn.close()
    assert [c.status for c in mock_control.calls()] == [0, 200]


def test_latency(client: Client, mock_control: MockControl) -> None:
    mock_control.set_fault("slow", latency_ms=150)
    started = time.monotonic()
    assert client.chat("slow", "hi")[0] == 200
    assert time.monotonic() - started >= 0.15


def test_invalid_fault_is_rejected(client: Client) -> None:
    assert client.post("/_mock/faults", {"model": "echo", "statuses": [700]})[0] == 400
    assert client.post("/_mock/faults", {"model": "echo", "bogus": 1})[0] == 400


def test_clear_calls(client: Client, mock_control: MockControl) -> None:
    client.chat("echo", "hi")
    assert len(mock_control.calls()) == 1
    mock_control.clear_calls()
    assert mock_control.calls() == []


def test_stop_closes_open_connections() -> None:
    server = MockLLM().start()
    c = Client(server.url)
    assert c.chat("echo", "hi")[0] == 200
    server.stop()
    with pytest.raises(OSError):  # the kept-alive connection was reset
        c.chat("echo", "hi")
    with pytest.raises(OSError):  # nobody listens any more
        Client(server.url).chat("echo", "hi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _stopped_by_sigterm(proc: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """`proc`, which must exit 0 on the SIGTERM it gets at the end (killed if the test failed first)."""
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_in_another_process_stops_on_sigterm() -> None:
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = f"from multillm.mock_llm import main; main(port={port}, latency_ms=1)"
    with _stopped_by_sigterm(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL)):
        control = MockControl(f"http://127.0.0.1:{port}/v1")
        control.wait_ready(timeout=15)
        control.set_fault("echo", statuses=[503])
        c = Client(f"http://127.0.0.1:{port}/v1")
        assert c.chat("echo", "hi")[0] == 503
        assert c.chat("echo", "hi")[0] == 200
        c.conn.close()
        assert [call.status for call in control.calls()] == [503, 200]


def test_random_errors_follow_the_rate_and_the_seed(mock_llm: MockLLM, mock_control: MockControl) -> None:
    mock_control.set_fault("flaky", error_rate=0.5, error_statuses=[503, 429], seed=7)
    client = Client(mock_llm.url)
    statuses = [client.chat("flaky", "hi")[0] for _ in range(200)]
    assert set(statuses) == {200, 503, 429}
    assert 60 < statuses.count(200) < 140
    mock_control.set_fault("flaky", error_rate=0.5, error_statuses=[503, 429], seed=7)
    assert [client.chat("flaky", "hi")[0] for _ in range(200)] == statuses  # same seed, same run


def test_multillm_mock_llm_by_hand_takes_150_ms_and_the_help_example_works() -> None:
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "multillm", "--log-json", "mock-llm", "--port", str(port)]
    helped = subprocess.run(
        [sys.executable, "-m", "multillm", "mock-llm", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    [example] = re.findall(r"curl -X POST http://127\.0\.0\.1:8089(/\S+) -d '(.+)'", helped.stdout)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with _stopped_by_sigterm(proc):
        assert proc.stderr is not None
        listening = json.loads(proc.stderr.readline())  # the first line it logs, once it serves
        assert listening["event"] == "mock_llm.listening"
        assert listening["latency_ms"] == 150  # as the docs, the demo and docker-compose.yml say
        c = Client(f"http://127.0.0.1:{port}/v1")
        path, body = example
        assert c.post(path, body.encode())[0] == 200
        assert [c.chat("echo", "hi")[0] for _ in range(3)] == [503, 429, 200]  # the faults the example sets
        c.conn.close()


# --- streaming, read by the openai SDK's own streaming API ------------------------------------


@pytest.fixture
def sdk(mock_llm: MockLLM) -> Iterator[Any]:
    import openai

    with openai.OpenAI(base_url=mock_llm.url, api_key="tok", max_retries=0, timeout=10) as opened:
        yield opened


def test_a_streamed_answer_is_the_whole_answer_a_word_a_chunk(sdk: Any, mock_control: MockControl) -> None:
    whole = sdk.chat.completions.create(model="upper", messages=[{"role": "user", "content": "one two three"}])
    stream = sdk.chat.completions.create(
        model="upper",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == ["upper ", "says: ", "ONE ", "TWO ", "THREE"]
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id == mock_control.calls()[-1].id


def test_a_stream_cut_after_n_tokens_fails_after_them(sdk: Any, mock_control: MockControl) -> None:
    import openai

    mock_control.set_fault("echo", cut_after_tokens=2, token_delay_ms=5)
    stream = sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b c d"}], stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk.choices[0].delta.content)
    assert seen == ["echo ", "says: "]


def test_a_stream_can_fail_before_its_first_token(sdk: Any, mock_control: MockControl) -> None:
    import openai

    mock_control.set_fault("echo", statuses=[503])
    with pytest.raises(openai.InternalServerError) as failed:
        sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], stream=True)
    assert failed.value.status_code == 503

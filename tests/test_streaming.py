"""The primary's answer streamed over AMQP (`x-multillm-stream`), on the real broker, with the mock LLM
streaming server-sent events a token at a time.

The wire is read with raw pika and Fixpoint's generated models; the callers are `Client.stream`,
`AsyncClient.stream`, a named `ReplyQueue` and `multillm request --stream`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fixpoint_openapi.models as fp
import pika
import pytest

from multillm import contract
from multillm.errors import Unavailable
from multillm.mock_llm import MockControl
from multillm.producers import AsyncClient, Client, ReplyQueue, StreamDelta, StreamText, make_request
from multillm.schemas import V1ChatCompletionChunk, encode
from multillm.sinks import Sink
from tests.conftest import StartWorker, wait_for_records
from tests.test_cli import multillm

# Spelled as the contract spells them, not taken from our contract module: what a foreign caller sends.
STREAM_HEADER = "x-multillm-stream"
CHUNK_TYPE = "V1ChatCompletionChunk"
PROMPT = " ".join(f"word{i}" for i in range(40))
ANSWER = f"echo says: {PROMPT}"

Message = tuple[pika.BasicProperties, bytes]


@pytest.fixture
def slow_tokens(mock_control: MockControl) -> MockControl:
    """The echo model writes a token every 15 ms: a 42-token answer takes about 0.6 s."""
    mock_control.set_fault("echo", token_delay_ms=15)
    return mock_control


class RawCaller:
    """A caller written against the contract only: raw pika, its own reply queue or direct reply-to."""

    def __init__(self, broker_url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self.channel = self.connection.channel()
        self.received: list[Message] = []

    def listen(self, reply_to: str) -> None:
        if reply_to != contract.DIRECT_REPLY_TO:
            self.channel.queue_declare(reply_to, durable=True, arguments={"x-queue-type": "quorum"})
        self.channel.basic_consume(
            reply_to, lambda ch, method, props, body: self.received.append((props, body)), auto_ack=True
        )

    def publish(self, request: bytes, reply_to: str, *, stream: bool = True, correlation_id: str = "c-1") -> str:
        """Returns the request's id (its message id)."""
        request_id = f"req-{uuid.uuid4().hex[:8]}"
        self.channel.basic_publish(
            "multillm.requests",
            "multillm.requests",
            request,
            pika.BasicProperties(
                content_type="application/json",
                message_id=request_id,
                correlation_id=correlation_id,
                reply_to=reply_to,
                headers={STREAM_HEADER: True} if stream else {},
            ),
        )
        return request_id

    def until_final(self, timeout: float = 30.0) -> list[Message]:
        """Every message up to and with the final reply (the first that is not a chunk)."""
        deadline = time.monotonic() + timeout
        while not any(props.type != CHUNK_TYPE for props, _ in self.received):
            assert time.monotonic() < deadline, f"no final reply; got {len(self.received)} chunks"
            self.connection.process_data_events(time_limit=0.05)
        return self.received

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def caller(broker_url: str) -> Iterator[RawCaller]:
    opened = RawCaller(broker_url)
    yield opened
    opened.close()


def fixpoint_request(*models: str, prompt: str = PROMPT) -> bytes:
    request = fp.V1CreateMultiLLMChatCompletionRequest(
        models=[fp.V1Model(name=name) for name in models],
        messages=[fp.V1InputMessage(role="user", content=prompt)],
    )
    return request.to_json().encode()


def chunks_of(messages: list[Message]) -> list[dict[str, Any]]:
    return [json.loads(body) for props, body in messages if props.type == CHUNK_TYPE]


@pytest.mark.parametrize("reply_to", ["direct reply-to", "named queue"])
def test_chunks_then_the_reply_on_the_wire(
    start_worker: StartWorker, caller: RawCaller, sink: Sink, slow_tokens: MockControl, reply_to: str
) -> None:
    start_worker("primary")
    start_worker("model", model="mock/upper")
    queue = contract.DIRECT_REPLY_TO if reply_to == "direct reply-to" else f"raw-replies-{uuid.uuid4().hex[:6]}"
    caller.listen(queue)
    request_id = caller.publish(fixpoint_request("mock/echo", "mock/upper"), queue)
    messages = caller.until_final()

    *chunk_messages, (final_props, final_body) = messages
    assert chunk_messages, "no chunk came before the reply"
    for props, _ in chunk_messages:
        assert (props.type, props.correlation_id, props.content_type) == (CHUNK_TYPE, "c-1", "application/json")
    chunks = chunks_of(messages)
    assert all(set(chunk) == {"id", "streamId", "seq", "delta"} for chunk in chunks)
    assert [chunk["seq"] for chunk in chunks] == list(range(len(chunks)))
    assert len({chunk["streamId"] for chunk in chunks}) == 1
    # Coalesced: 42 tokens 15 ms apart, a chunk each 50 ms at most after the first, make fewer chunks than tokens.
    assert 2 <= len(chunks) < 42

    assert (final_props.type, final_props.correlation_id) == ("V1MultiLLMChatCompletion", "c-1")
    reply = fp.V1MultiLLMChatCompletion.from_json(final_body.decode())
    assert reply is not None
    text = reply.completion.choices[0].message.content
    assert "".join(chunk["delta"] for chunk in chunks) == text == ANSWER
    assert {chunk["id"] for chunk in chunks} == {reply.id}

    # One record per model; the primary's holds the whole answer and its time to first token, the
    # other model's is as it always was (not streamed).
    records = {r.model_name: r for r in wait_for_records(sink, request_id, 2)}
    primary, other = records["mock/echo"], records["mock/upper"]
    assert primary.log_id == reply.id and primary.output is not None and primary.output[0].message.content == ANSWER
    assert primary.time_to_first_token_ms is not None and 0 < primary.time_to_first_token_ms < primary.latency_ms
    assert other.time_to_first_token_ms is None and other.status == "ok"


def test_no_chunks_without_the_header(start_worker: StartWorker, caller: RawCaller, slow_tokens: MockControl) -> None:
    start_worker("primary")
    caller.listen(contract.DIRECT_REPLY_TO)
    caller.publish(fixpoint_request("mock/echo"), contract.DIRECT_REPLY_TO, stream=False)
    [(props, _)] = caller.until_final()
    assert props.type == "V1MultiLLMChatCompletion"
    # Nothing trails the reply either.
    caller.connection.process_data_events(time_limit=0.3)
    assert len(caller.received) == 1


def test_client_stream_yields_deltas_that_add_up_to_the_reply(
    start_worker: StartWorker, client: Client, slow_tokens: MockControl
) -> None:
    start_worker("primary")
    stream = client.stream(make_request(["mock/echo"], PROMPT))
    arrived: list[tuple[float, StreamDelta]] = [(time.monotonic(), delta) for delta in stream]
    assert stream.reply is not None and stream.reply.text == ANSWER
    deltas = [delta for _, delta in arrived]
    assert not any(delta.restart for delta in deltas)
    assert "".join(delta.text for delta in deltas) == ANSWER
    # As it was written: the first delta came well before the last (42 tokens, 15 ms apart).
    assert len(deltas) >= 2 and arrived[-1][0] - arrived[0][0] > 0.2


def test_a_stream_cut_midway_is_retried_under_a_new_stream_id(
    start_worker: StartWorker, caller: RawCaller, client: Client, mock_control: MockControl
) -> None:
    start_worker("primary")
    # The first streamed answer dies after 10 tokens, as a provider that dropped the connection.
    mock_control.set_fault("echo", token_delay_ms=10, cut_after_tokens=10, cut_streams=1)
    caller.listen(contract.DIRECT_REPLY_TO)
    caller.publish(fixpoint_request("mock/echo"), contract.DIRECT_REPLY_TO)
    messages = caller.until_final()
    chunks = chunks_of(messages)
    streams = list(dict.fromkeys(chunk["streamId"] for chunk in chunks))
    assert len(streams) == 2, chunks
    first, second = ([c for c in chunks if c["streamId"] == s] for s in streams)
    assert [c["seq"] for c in second] == list(range(len(second)))
    assert chunks.index(first[-1]) < chunks.index(second[0])  # the new try starts after the old one ends
    # What the cut try sent: the start of its 10 tokens (those still held when it broke were dropped).
    cut_text = "".join(c["delta"] for c in first)
    assert cut_text and (" ".join(ANSWER.split()[:10]) + " ").startswith(cut_text)
    assert (
        "".join(c["delta"] for c in second)
        == ANSWER
        == json.loads(messages[-1][1])["completion"]["choices"][0]["message"]["content"]
    )

    # Through the client, the text shown never repeats: the new try is silent until it passes the old.
    mock_control.set_fault("echo", token_delay_ms=10, cut_after_tokens=10, cut_streams=1)
    stream = client.stream(make_request(["mock/echo"], PROMPT))
    deltas = list(stream)
    assert not any(delta.restart for delta in deltas)
    assert "".join(delta.text for delta in deltas) == ANSWER


def test_a_primary_killed_mid_stream_restarts_it_on_another_worker(
    start_worker: StartWorker, client: Client, mock_control: MockControl
) -> None:
    mock_control.set_fault("echo", token_delay_ms=40)  # about 1.7 s for the whole answer
    doomed = start_worker("primary", concurrency=1)
    stream = client.stream(make_request(["mock/echo"], PROMPT), timeout=60)
    deltas = iter(stream)
    shown = [next(deltas)]
    doomed.kill()  # SIGKILL: the broker redelivers the request to the next primary
    start_worker("primary")
    shown += list(deltas)
    assert stream.reply is not None and stream.reply.text == ANSWER
    assert [call.model for call in mock_control.calls()] == ["echo", "echo"]  # a second try, on the new worker
    # The new worker's stream repeats what was shown first: nothing is shown twice.
    assert not any(delta.restart for delta in shown)
    assert "".join(delta.text for delta in shown) == ANSWER


def test_an_error_mid_stream_ends_the_iteration_with_the_typed_error(
    start_worker: StartWorker, client: Client, mock_control: MockControl
) -> None:
    start_worker("primary")
    # Every try is cut after 5 tokens: the retries run out, the reply is UNAVAILABLE.
    mock_control.set_fault("echo", token_delay_ms=5, cut_after_tokens=5)
    stream = client.stream(make_request(["mock/echo"], PROMPT))
    shown: list[StreamDelta] = []
    with pytest.raises(Unavailable) as failed:
        for delta in stream:
            shown.append(delta)
    assert "".join(delta.text for delta in shown) == " ".join(ANSWER.split()[:5]) + " "
    assert failed.value.code == 14 and stream.reply is None


def test_async_client_stream(start_worker: StartWorker, broker_url: str, slow_tokens: MockControl) -> None:
    start_worker("primary")

    async def main() -> tuple[list[StreamDelta], str]:
        async with AsyncClient(broker_url, timeout=30) as client:
            stream = await client.stream(make_request(["mock/echo"], PROMPT))
            deltas = [delta async for delta in stream]
            assert stream.reply is not None
            return deltas, stream.reply.text

    deltas, text = asyncio.run(main())
    assert len(deltas) >= 2 and text == ANSWER
    assert "".join(delta.text for delta in deltas) == ANSWER


def test_a_named_reply_queue_gets_chunks_and_a_slow_reader_loses_nothing(
    start_worker: StartWorker, client: Client, broker_url: str, slow_tokens: MockControl
) -> None:
    start_worker("primary")
    name = f"service-replies-{uuid.uuid4().hex[:6]}"
    ids = [client.publish(make_request(["mock/echo"], f"{PROMPT} n{n}"), reply_to=name, stream=True) for n in range(3)]

    texts = {request_id: StreamText() for request_id in ids}
    shown = {request_id: "" for request_id in ids}
    finals: dict[str, str] = {}

    def on_chunk(request_id: str | None, chunk: V1ChatCompletionChunk) -> None:
        time.sleep(0.06)  # a reader slower than the chunks come (one each 50 ms or so): they wait in the queue
        for delta in texts[request_id or ""].add(chunk):
            shown[request_id or ""] += delta.text

    def on_reply(reply: Any) -> None:
        finals[reply.request_id] = reply.result().text

    queue = ReplyQueue(broker_url, name)
    try:
        assert queue.consume(on_reply, limit=3, idle_timeout=20, on_chunk=on_chunk) == 3
    finally:
        queue.close()
    for n, request_id in enumerate(ids):
        assert finals[request_id] == shown[request_id] == f"{ANSWER} n{n}"


def test_request_command_streams(start_worker: StartWorker, config_path: Any, broker_url: str) -> None:
    start_worker("primary")
    done = multillm(
        "request", "--model", "mock/echo", "--stream", "streamed from the command line",
        env={"MULTILLM_CONFIG": str(config_path), "MULTILLM_BROKER_URL": broker_url}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "echo says: streamed from the command line\n"


def test_stream_text_never_shows_a_given_up_try_twice() -> None:
    text = StreamText()

    def chunk(stream: str, seq: int, delta: str) -> V1ChatCompletionChunk:
        return V1ChatCompletionChunk(id="log", stream_id=stream, seq=seq, delta=delta)

    assert text.add(chunk("a", 0, "Hello ")) == [StreamDelta("Hello ")]
    assert text.add(chunk("a", 1, "wor")) == [StreamDelta("wor")]
    assert text.add(chunk("a", 1, "wor")) == []  # a copy
    # A new try: silent while it repeats what is shown, then only what is new.
    assert text.add(chunk("b", 0, "Hello ")) == []
    assert text.add(chunk("b", 1, "world")) == [StreamDelta("ld")]
    assert text.add(chunk("a", 2, "ms")) == []  # late words of the given-up try
    # A try that says something else replaces the text.
    assert text.add(chunk("c", 0, "Hi")) == [StreamDelta("Hi", restart=True)]
    # A lost chunk: the rest of that try is unknown until the final reply settles it.
    assert text.add(chunk("c", 2, " there")) == []
    assert text.finish("Hi, there") == [StreamDelta(", there")]
    assert text.finish("Hi, there") == []
    assert encode(chunk("a", 0, "x")) == b'{"id":"log","streamId":"a","seq":0,"delta":"x"}'

"""The baselines written the way a user would write them by hand, with pika and the openai SDK alone.

Run as a process of its own (`python -m multillm.bench.bare MODE ...`), like a worker:

- `echo`: consume a queue and send each body straight back to its `reply_to`. With
  `rpc_round_trip` on the caller's side it is the broker's floor for one RPC.
- `loop`: the primary worker's job and nothing more: decode the request, call the
  model with the SDK, publish the other models' copies, reply, ack. No records, no
  retries, no deadlines, no bad-input handling: the limit our worker is held to.
- `burst`: no broker at all: `--requests` model calls from one asyncio loop, at most
  `--concurrency` at once, through the openai SDK's typed `create` over its aiohttp
  transport (`--client sdk`) or through aiohttp alone (`--client aiohttp`, this
  machine's floor for HTTP from Python); prints each call's end, in seconds from the
  first, as JSON.

Both keep the guarantees the pipeline gives, so that the comparison is of the code
and not of the durability: quorum queues, persistent messages, publisher confirms,
and the ack only after the reply is confirmed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import openai
import pika
from pika.adapters.blocking_connection import BlockingChannel

from multillm import contract
from multillm.contract import QueueSpec
from multillm.schemas import (
    V1ChatCompletion,
    V1ChatCompletionMessage,
    V1Choice,
    V1CreateMultiLLMChatCompletionRequest,
    V1MultiLLMChatCompletion,
    V1Usage,
    decode_request,
    encode,
)

ECHO_QUEUE = "multillm-bench.echo"
LOOP_QUEUE = contract.REQUEST_QUEUE


def echo_queue() -> QueueSpec:
    """A work queue like `multillm.requests` (quorum, same arguments) under another name."""
    spec = contract.requests_queue()
    return QueueSpec(name=ECHO_QUEUE, exchange="", routing_key="", arguments=spec.arguments)


def _persistent(props: pika.BasicProperties, kind: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=contract.CONTENT_TYPE,
        delivery_mode=contract.PERSISTENT,
        correlation_id=props.correlation_id,
        type=kind,
    )


def _consume(broker_url: str, queue: QueueSpec, handle: Callable[[BlockingChannel, Any, Any, bytes], None]) -> None:
    """One connection, confirms on, prefetch 1: the plainest correct consumer."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_qos(prefetch_count=1)
    channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    channel.basic_consume(queue.name, lambda ch, method, props, body: handle(ch, method, props, body))
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):  # the benchmark deletes the vhost under us
        channel.start_consuming()


def serve_echo(broker_url: str) -> None:
    def handle(channel: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        channel.basic_publish("", props.reply_to, body, _persistent(props, "echo"))
        channel.basic_ack(method.delivery_tag)

    _consume(broker_url, echo_queue(), handle)


def serve_loop(broker_url: str, mock_url: str) -> None:
    sdk = openai.OpenAI(base_url=mock_url, api_key="unused", max_retries=0)

    def handle(channel: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        request = decode_request(body)
        for index, model in enumerate(request.models):
            if index != request.display_model:
                copy = encode(msgspec.structs.replace(request, display_model=index))
                channel.basic_publish(contract.MODEL_EXCHANGE, model.name, copy, _persistent(props, "copy"))
        reply = _answer(sdk, request)
        channel.basic_publish("", props.reply_to, encode(reply), _persistent(props, contract.TYPE_REPLY))
        channel.basic_ack(method.delivery_tag)

    _consume(broker_url, contract.requests_queue(), handle)


def _answer(sdk: openai.OpenAI, request: V1CreateMultiLLMChatCompletionRequest) -> V1MultiLLMChatCompletion:
    primary = request.primary
    response = sdk.chat.completions.create(
        model=primary.name.partition("/")[2],
        messages=[{"role": "user", "content": m.content or ""} for m in request.messages],  # type: ignore[misc]
    )
    choice = response.choices[0]
    usage = response.usage
    completion = V1ChatCompletion(
        id=str(uuid.uuid4()),
        external_id=response.id,
        model=primary.name,
        choices=[
            V1Choice(
                index=0,
                message=V1ChatCompletionMessage(content=choice.message.content),
                finish_reason=choice.finish_reason,
            )
        ],
        usage=V1Usage(
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            total_tokens=usage.total_tokens if usage else 0,
        ),
    )
    return V1MultiLLMChatCompletion(
        id=completion.id,
        primary_external_id=response.id,
        model_names=request.model_names(),
        display_model=request.display_model,
        completion=completion,
    )


class RpcCaller:
    """The caller's half of the floor: publish to the echo queue, wait for the body to come back.

    Owns one pika connection; used from one thread.
    """

    def __init__(self, broker_url: str) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        spec = contract.client_reply_queue(uuid.uuid4().hex)
        self._channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        self._reply_queue = spec.name
        self._answers: dict[str, bytes] = {}
        self._channel.basic_consume(spec.name, self._on_reply)

    def _on_reply(self, channel: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        self._answers[props.correlation_id] = body
        channel.basic_ack(method.delivery_tag)

    def call(self, body: bytes, timeout: float = 30.0) -> bytes:
        correlation_id = uuid.uuid4().hex
        props = pika.BasicProperties(
            content_type=contract.CONTENT_TYPE,
            delivery_mode=contract.PERSISTENT,
            correlation_id=correlation_id,
            reply_to=self._reply_queue,
        )
        self._channel.basic_publish("", ECHO_QUEUE, body, props, mandatory=True)
        deadline = time.monotonic() + timeout
        while correlation_id not in self._answers:
            if time.monotonic() > deadline:
                raise TimeoutError("the echo server did not answer")
            self._connection.process_data_events(time_limit=1)
        return self._answers.pop(correlation_id)

    def close(self) -> None:
        self._channel.queue_delete(self._reply_queue)
        self._connection.close()


class DirectCaller:
    """A caller by hand on RabbitMQ's direct reply-to: one pika connection, used from one thread.

    The caller "seen from outside" (`multillm.bench.outside`): it knows the wire, not our code.
    Replies come to `amq.rabbitmq.reply-to` on the channel that published (auto-ack, as
    direct reply-to requires). With `confirms`, every publish waits for the broker's confirm,
    as a careful caller's would; without, a `burst` is written out with no wait between
    messages, as close to one instant as a client can make it.
    """

    def __init__(self, broker_url: str, *, confirms: bool = True) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        self._channel = self._connection.channel()
        if confirms:
            self._channel.confirm_delivery()
        self._answers: dict[str, float] = {}
        self._errors: list[str] = []
        self._channel.basic_consume(contract.DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, _channel: BlockingChannel, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        if props.type == contract.TYPE_ERROR:
            # An error answers as fast as a completion or faster: counted as one, it would flatter the figures.
            self._errors.append(body[:300].decode(errors="replace"))
        self._answers[props.correlation_id] = time.perf_counter()

    def _publish(self, queue: str, body: bytes) -> str:
        correlation_id = uuid.uuid4().hex
        props = pika.BasicProperties(
            content_type=contract.CONTENT_TYPE,
            delivery_mode=contract.PERSISTENT,
            correlation_id=correlation_id,
            reply_to=contract.DIRECT_REPLY_TO,
        )
        self._channel.basic_publish("", queue, body, props)
        return correlation_id

    def _wait(self, correlation_ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not correlation_ids <= self._answers.keys():
            if self._errors:
                raise RuntimeError(f"{len(self._errors)} requests answered with an error, the first: {self._errors[0]}")
            if time.monotonic() > deadline:
                missing = len(correlation_ids - self._answers.keys())
                raise TimeoutError(f"{missing} of {len(correlation_ids)} replies did not come within {timeout:g}s")
            self._connection.process_data_events(time_limit=0.05)

    def call(self, queue: str, body: bytes, timeout: float = 30.0) -> None:
        """Publish `body` to `queue` and wait for its reply."""
        correlation_id = self._publish(queue, body)
        self._wait({correlation_id}, timeout)
        del self._answers[correlation_id]

    def burst(self, queue: str, bodies: list[bytes], timeout: float = 120.0) -> tuple[float, list[float]]:
        """Publish all of `bodies` at once, wait for every reply: the seconds the publishing took,
        and each reply's time in seconds from the first publish, in order."""
        started = time.perf_counter()
        ids = {self._publish(queue, body) for body in bodies}
        published = time.perf_counter() - started
        self._wait(ids, timeout)
        return published, sorted(self._answers.pop(i) - started for i in ids)

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            self._connection.close()


def burst(mock_url: str, concurrency: int, requests: int, client: str) -> list[float]:
    """Each call's end in seconds from the first call, in order (see `burst` in the docstring)."""

    async def run() -> list[float]:
        slots = asyncio.Semaphore(concurrency)
        ended: list[float] = []
        async with (
            openai.AsyncOpenAI(
                base_url=mock_url, api_key="unused", max_retries=0, http_client=openai.DefaultAioHttpClient()
            ) as sdk,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):

            async def call(i: int) -> None:
                messages = [{"role": "user", "content": f"Say something short about message queues. #{i}"}]
                async with slots:
                    if client == "sdk":
                        await sdk.chat.completions.create(model="echo", messages=messages)  # type: ignore[arg-type]
                    else:
                        url = f"{mock_url}/chat/completions"
                        async with session.post(url, json={"model": "echo", "messages": messages}) as response:
                            response.raise_for_status()
                            await response.read()
                ended.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(call(i) for i in range(requests)))
        return sorted(ended)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m multillm.bench.bare", description=__doc__)
    parser.add_argument("mode", choices=["echo", "loop", "burst"])
    parser.add_argument("--broker-url", default="")
    parser.add_argument("--mock-url", default="")
    parser.add_argument("--threads", type=int, default=1, help="loop: consumers, one connection each")
    parser.add_argument("--concurrency", type=int, default=64, help="burst: calls at once")
    parser.add_argument("--requests", type=int, default=256, help="burst: calls in all")
    parser.add_argument("--client", choices=["sdk", "aiohttp"], default="sdk", help="burst: what calls")
    args = parser.parse_args()
    if args.mode in ("loop", "burst") and not args.mock_url:
        parser.error(f"{args.mode} needs --mock-url")
    if args.mode in ("echo", "loop") and not args.broker_url:
        parser.error(f"{args.mode} needs --broker-url")
    if args.mode == "burst":
        ended = burst(args.mock_url, args.concurrency, args.requests, args.client)
        print(msgspec.json.encode(ended).decode())
        return
    # A SIGTERM ends the process at once: a bare loop has no graceful stop.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.mode == "echo":
        serve_echo(args.broker_url)
        return
    threads = [
        threading.Thread(target=serve_loop, args=(args.broker_url, args.mock_url), daemon=True)
        for _ in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()

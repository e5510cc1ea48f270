"""Scenario: a streamed answer: time to first token at the caller against the floor, and tokens/s.

Time to first token (TTFT) of `Client.stream` is sampled alternately with the floor: a bare pika
round trip through the same broker plus a bare streaming openai SDK call to the same mock, timed to
its first text delta. Then `concurrency` streams at once, long answers: the tokens the callers get
per second against what the model writes (the bound), for each coalescing setting of `[stream]`,
with the chunks each answer took and the primary worker's and the broker's CPU.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import openai

from multillm.bench import bare
from multillm.bench.common import ONE, Section, Sizes, ms, primary, verdict
from multillm.bench.drive import alternately, percentile
from multillm.bench.harness import Bench, CpuShares, broker_pid, python_module
from multillm.config import StreamConfig
from multillm.producers import Client, make_request
from multillm.schemas import encode
from multillm.sinks import RecordFilter, open_sink

# The mock writes a token this often (a fast model: 50 tokens/s).
TOKEN_DELAY_MS: Final = 20.0
# The TTFT prompt: a short answer ("echo says: hi"), so that a sample is mostly its first token.
SHORT: Final = "hi"
# The load's prompt: an answer of 42 tokens, about 0.84 s at TOKEN_DELAY_MS.
LONG: Final = " ".join(f"word{i}" for i in range(40))


def time_to_first_token(bench: Bench, sizes: Sizes) -> Section:
    """One stream at a time: `Client.stream` to its first delta, against the floor, sampled alternately."""
    bench.mock.set_fault("*", latency_ms=0, token_delay_ms=TOKEN_DELAY_MS)
    bench.declare(ONE)
    sdk = openai.OpenAI(base_url=bench.mock_url, api_key="unused", max_retries=0)
    echo = python_module("multillm.bench.bare", "echo", "--broker-url", bench.broker_url)
    with Client(bench.broker_url) as client, bench.child(echo, bare.ECHO_QUEUE):
        rpc = bare.RpcCaller(bench.broker_url)
        body = encode(make_request(ONE, SHORT))

        def floor(i: int) -> float:
            started = time.perf_counter()
            rpc.call(body)
            return _sdk_first_token(sdk, SHORT, started)

        def ours(i: int) -> float:
            started = time.perf_counter()
            deltas = iter(client.stream(make_request(ONE, SHORT, log_attributes={"bench": "ttft"})))
            next(deltas)
            first = (time.perf_counter() - started) * 1000
            for _ in deltas:  # the rest, and the final reply
                pass
            return first

        try:
            with primary(bench, 4):
                mine, base = alternately(ours, floor, sizes.stream_samples)
        finally:
            rpc.close()
    bench.purge()
    p50 = percentile(mine, 0.5) / percentile(base, 0.5)
    p99 = percentile(mine, 0.99) / percentile(base, 0.99)
    figures = [percentile(base, 0.5), percentile(base, 0.99), percentile(mine, 0.5), percentile(mine, 0.99)]
    # The worker's own view: from the call's start to the model's first text (the records' field).
    sink = open_sink(bench.sink_url)
    try:
        records = sink.records(where=RecordFilter(attributes={"bench": "ttft"}))
    finally:
        sink.close()
    at_worker = [r.time_to_first_token_ms for r in records if r.time_to_first_token_ms is not None]
    return Section(
        name="ttft",
        title="8. Streaming: time to first token, one stream at a time (ms)",
        headers=[
            "floor p50",
            "floor p99",
            "multillm p50",
            "multillm p99",
            "p50 ratio",
            "p99 ratio",
            "model's first token at the worker p50",
        ],
        rows=[[*map(ms, figures), f"{p50:.2f}", f"{p99:.2f}", ms(percentile(at_worker, 0.5))]],
        verdicts=[
            verdict("time to first token p50 / floor", p50, 1.3, at_most=True),
            verdict("time to first token p99 / floor", p99, 1.75, at_most=True),
        ],
        notes=[
            f"The mock writes a token every {TOKEN_DELAY_MS:g} ms. floor = a bare pika RPC round trip through "
            "the same broker (quorum queue, persistent, confirms) plus a bare streaming openai SDK call to the "
            "same mock, timed to its first text delta; sampled alternately with `Client.stream`, timed to its "
            "first delta. The last column is the records' `time_to_first_token_ms`: from the worker's call "
            "to the model's first text; the rest of the caller's time is the request's way to the worker and "
            "the first chunk's way back.",
        ],
        samples={"TTFT floor": base, "TTFT multillm": mine},
    )


def stream_load(bench: Bench, sizes: Sizes) -> Section:
    """`stream_concurrency` streams at once, for each `[stream] flush_ms` of `sizes`: tokens/s, chunks, CPU."""
    bench.mock.set_fault("*", latency_ms=0, token_delay_ms=TOKEN_DELAY_MS)
    bench.declare(ONE)
    sdk = openai.OpenAI(base_url=bench.mock_url, api_key="unused", max_retries=0)
    answer_s = _sdk_answer_seconds(sdk, LONG)
    concurrency, total = sizes.stream_concurrency, sizes.stream_requests
    rows: list[list[str]] = []
    verdicts: list[str] = []
    _bare_load(sdk, concurrency, concurrency)  # warm
    bare_tokens, bare_seconds = _bare_load(sdk, total, concurrency)
    bare_rate = bare_tokens / bare_seconds
    bound = concurrency * (bare_tokens / total) / answer_s
    rows.append(["bare SDK", "-", "-", f"{bare_rate:.0f}", f"{bound:.0f}", f"{bare_rate / bound:.2f}", "-", "-"])
    with Client(bench.broker_url, pool_size=8) as client:
        for flush_ms in sizes.stream_flush_ms:
            config = bench.config_with(StreamConfig(flush_ms=flush_ms))
            with primary(bench, concurrency, config=config) as (worker,):
                _load(client, concurrency, concurrency)  # warm: connections, threads
                pids = {"worker": [worker.pid]}
                if (broker := broker_pid()) is not None:
                    pids["broker"] = [broker]
                shares = CpuShares(pids)
                tokens, deltas, seconds = _load(client, total, concurrency)
                cpu = shares.stop()
            rate = tokens / seconds
            # % of one core over `seconds`, as CPU ms per answer.
            per_answer = {name: cpu[name] * seconds * 10 / total for name in pids}
            rows.append(
                [
                    "multillm",
                    f"{flush_ms:g}",
                    f"{deltas / total:.1f}",
                    f"{rate:.0f}",
                    f"{bound:.0f}",
                    f"{rate / bound:.2f}",
                    f"{per_answer['worker']:.2f}",
                    f"{per_answer['broker']:.2f}" if "broker" in per_answer else "-",
                ]
            )
            if flush_ms == StreamConfig().flush_ms:
                verdicts.append(
                    verdict(f"tokens/s / bare SDK's at {concurrency} streams", rate / bare_rate, 0.9, at_most=False)
                )
    bench.purge()
    return Section(
        name="stream_load",
        title=f"9. Streaming: {concurrency} streams at once, answers of 42 tokens, by `[stream] flush_ms`",
        headers=[
            "caller",
            "flush ms",
            "chunks/answer",
            "tokens/s",
            "bound",
            "/ bound",
            "worker CPU ms",
            "broker CPU ms",
        ],
        rows=rows,
        verdicts=verdicts,
        notes=[
            f"{total} streamed requests, {concurrency} in flight, each read to its end by a thread of its own: "
            f"first with the bare SDK against the mock (the baseline), then through multillm (`Client.stream`). "
            f"bound = what the model writes for {concurrency} streams ({answer_s * 1000:.0f} ms an answer from "
            "one bare streaming SDK call alone); chunks/answer counts the deltas a caller got; CPU ms per answer "
            "of the primary worker and of the broker over the run. Everything (mock, callers, worker, broker) "
            "shares this machine's cores.",
        ],
    )


def _sdk_first_token(sdk: openai.OpenAI, prompt: str, started: float) -> float:
    """ms from `started` to the first text delta of a bare streaming call; the rest is read too."""
    first: float | None = None
    stream = sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": prompt}], stream=True)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = (time.perf_counter() - started) * 1000
    assert first is not None, "the mock streamed no text"
    return first


def _sdk_answer_seconds(sdk: openai.OpenAI, prompt: str, tries: int = 3) -> float:
    """How long a bare streaming call takes for the whole answer (the best of `tries`)."""
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        for _chunk in sdk.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": prompt}], stream=True
        ):
            pass
        best = min(best, time.perf_counter() - started)
    return best


def _bare_load(sdk: openai.OpenAI, total: int, concurrency: int) -> tuple[int, float]:
    """`total` bare streaming SDK calls of LONG, `concurrency` at once: (tokens delivered, seconds)."""

    def one(i: int) -> int:
        tokens = 0
        for chunk in sdk.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": f"{LONG} n{i}"}],
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(total)))
    return tokens, time.perf_counter() - started


def _load(client: Client, total: int, concurrency: int) -> tuple[int, int, float]:
    """`total` streams of LONG, `concurrency` at once: (tokens delivered, deltas, seconds)."""

    def one(i: int) -> tuple[int, int]:
        stream = client.stream(make_request(ONE, f"{LONG} n{i}"))
        deltas = sum(1 for _ in stream)
        assert stream.reply is not None
        return stream.reply.completion.usage.completion_tokens, deltas

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(total)))
    seconds = time.perf_counter() - started
    return sum(t for t, _ in done), sum(d for _, d in done), seconds

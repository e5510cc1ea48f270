"""Scenario 1: the latency of one request at a time, against the floor, sampled alternately."""

from __future__ import annotations

import openai

from multillm.bench import bare
from multillm.bench.common import ONE, THREE, Section, Sizes, model_workers, ms, primary, verdict
from multillm.bench.drive import MakeRequest, interleaved, percentile, requests_for
from multillm.bench.harness import Bench, python_module
from multillm.producers import Client
from multillm.schemas import encode


def overhead(bench: Bench, sizes: Sizes) -> Section:
    """One request at a time: `Client.create` against a bare RPC round trip plus a bare SDK call."""
    bench.set_latency(0)
    bench.declare(THREE)
    rows: list[list[str]] = []
    verdicts: list[str] = []
    samples: dict[str, list[float]] = {}
    echo = python_module("multillm.bench.bare", "echo", "--broker-url", bench.broker_url)
    sdk = openai.OpenAI(base_url=bench.mock_url, api_key="unused", max_retries=0)
    with Client(bench.broker_url) as client, bench.child(echo, bare.ECHO_QUEUE):
        rpc = bare.RpcCaller(bench.broker_url)
        try:
            for models in (ONE, THREE):
                make = requests_for(models)
                body = encode(make(0))

                def floor(i: int, body: bytes = body) -> None:
                    rpc.call(body)
                    sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])

                def ours(i: int, make: MakeRequest = make) -> None:
                    client.create(make(i))

                with primary(bench, 4), model_workers(bench, models[1:]):
                    mine, base = interleaved(ours, floor, sizes.overhead_samples)
                label = f"{len(models)} model{'s' if len(models) > 1 else ''}"
                p50 = percentile(mine, 0.5) / percentile(base, 0.5)
                p99 = percentile(mine, 0.99) / percentile(base, 0.99)
                figures = [percentile(base, 0.5), percentile(base, 0.99), percentile(mine, 0.5), percentile(mine, 0.99)]
                rows.append([label, *map(ms, figures), f"{p50:.2f}", f"{p99:.2f}"])
                samples[f"floor ({label})"], samples[f"multillm ({label})"] = base, mine
                if models is ONE:
                    verdicts += [
                        verdict("overhead p50 / floor", p50, 1.3, at_most=True),
                        verdict("overhead p99 / floor", p99, 1.75, at_most=True),
                    ]
        finally:
            rpc.close()
    bench.purge()
    return Section(
        name="overhead",
        title="1. Overhead: one request at a time, mock latency 0 (ms)",
        headers=["models", "floor p50", "floor p99", "multillm p50", "multillm p99", "p50 ratio", "p99 ratio"],
        rows=rows,
        verdicts=verdicts,
        notes=[
            "floor = a bare pika RPC round trip through the same broker (quorum queue, persistent, confirms) "
            "plus a bare openai SDK call to the same mock; the two are sampled alternately, one by one.",
            "The targets judge the one-model row, whose floor is the same job. With three models the floor "
            "stays one call, while the two model workers call their models and write their records on the "
            "same two cores at the same moment as the primary's call: the row shows what that sharing costs "
            "the caller here (elsewhere, those workers run on machines of their own).",
        ],
        samples=samples,
    )

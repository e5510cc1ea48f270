"""Scenarios 11 and 12: the pipeline seen from outside, by parts none of ours.

The caller is raw pika on direct reply-to (`bare.DirectCaller`), not our `Client`; the model
is `foreign_mock`, not our mock. So neither our producer nor our mock can hide, or add, a
delay: what is left is the broker, the model server and the primary worker.

- `tail`: one request at a time, sampled alternately with the floor; p99 is judged as well
  as p50, with enough samples that p99 is not one unlucky request.
- `burst`: four times the worker's concurrency published at once, a model taking 1 s: a
  perfect worker answers in four waves, so the last reply comes after 4 s. Judged on that
  last reply, which the slow-model scenario (steady state only) does not see.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import openai

from multillm import contract
from multillm.bench import bare
from multillm.bench.common import ONE, Section, Sizes, ms, primary, verdict
from multillm.bench.drive import interleaved, percentile, requests_for
from multillm.bench.harness import Bench, CpuShares, free_port, python_module
from multillm.schemas import encode
from multillm.testbed.processes import ChildProcess, write_worker_config

BURST_WAVES = 4


@contextlib.contextmanager
def foreign_mock(bench: Bench, latency_ms: float) -> Iterator[tuple[str, Path]]:
    """`foreign_mock` in its own process: its URL, and a worker configuration whose provider `mock` is it."""
    port = free_port()
    process = ChildProcess(
        python_module("multillm.bench.foreign_mock", "--port", str(port), "--latency-ms", str(latency_ms)),
        log_path=bench.log_path,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or not process.alive():
                    raise RuntimeError(f"the foreign mock did not listen on port {port}") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1"
        config = write_worker_config(
            bench.folder, broker_url=bench.broker_url, sink_url=bench.sink_url, mock_url=url, name="foreign.toml"
        )
        yield url, config
    finally:
        process.stop()


def tail(bench: Bench, sizes: Sizes) -> Section:
    """One request at a time from a raw pika caller, against the floor: p50 and p99."""
    bench.declare(ONE)
    count = sizes.tail_samples
    make = requests_for(ONE)
    bodies = [encode(make(i)) for i in range(count)]  # the warm-up sends the first 20 again
    echo = python_module("multillm.bench.bare", "echo", "--broker-url", bench.broker_url)
    with (
        foreign_mock(bench, 0) as (url, config),
        bench.child(echo, bare.ECHO_QUEUE),
        primary(bench, 4, config=config),
        openai.OpenAI(base_url=url, api_key="unused", max_retries=0) as sdk,
    ):
        caller = bare.DirectCaller(bench.broker_url)
        try:

            def floor(i: int) -> None:
                caller.call(bare.ECHO_QUEUE, bodies[i])
                sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])

            def ours(i: int) -> None:
                caller.call(contract.REQUEST_QUEUE, bodies[i])

            mine, base = interleaved(ours, floor, count)
        finally:
            caller.close()
    bench.purge()
    p50 = percentile(mine, 0.5) / percentile(base, 0.5)
    p99 = percentile(mine, 0.99) / percentile(base, 0.99)
    figures = [percentile(base, 0.5), percentile(base, 0.99), percentile(mine, 0.5), percentile(mine, 0.99)]
    slowest = sorted(mine)[-5:]
    return Section(
        name="tail",
        title=f"11. Seen from outside, one at a time: {count} requests, raw pika on direct reply-to (ms)",
        headers=["floor p50", "floor p99", "multillm p50", "multillm p99", "p50 ratio", "p99 ratio"],
        rows=[[*map(ms, figures), f"{p50:.2f}", f"{p99:.2f}"]],
        verdicts=[
            verdict("outside p50 / floor", p50, 1.15, at_most=True),
            verdict("outside p99 / floor", p99, 1.5, at_most=True),
        ],
        notes=[
            "The caller: raw pika, confirms on, replies on `amq.rabbitmq.reply-to`. The model: "
            "`multillm/bench/foreign_mock.py` (aiohttp.web, no code of ours), answering at once. "
            "The floor: the same caller's round trip through an echo consumer on the same broker, "
            "plus a bare openai SDK call to the same server; sampled alternately with ours.",
            f"The five slowest of ours: {', '.join(map(ms, slowest))} ms.",
        ],
        samples={"floor (outside)": base, "multillm (outside)": mine},
    )


def burst(bench: Bench, sizes: Sizes) -> Section:
    """Four times the concurrency at once, a 1 s model: when does the last reply come, against
    the same burst of calls made with no broker, through the openai SDK and through aiohttp alone?"""
    bench.declare(ONE)
    make = requests_for(ONE)
    rows: list[list[str]] = []
    verdicts: list[str] = []
    latency_s = sizes.burst_latency_s
    bound = BURST_WAVES * latency_s
    with foreign_mock(bench, latency_s * 1000) as (url, config):
        for concurrency in sizes.burst_concurrency:
            total = BURST_WAVES * concurrency
            alone = {client: _calls_alone(url, client, concurrency, total) for client in ("aiohttp", "sdk")}
            bodies = [encode(make(i)) for i in range(total)]
            with primary(bench, concurrency, config=config) as (worker,):
                caller = bare.DirectCaller(bench.broker_url, confirms=False)
                try:
                    shares = CpuShares({"worker": [worker.pid]})
                    published, ours = caller.burst(contract.REQUEST_QUEUE, bodies)
                    cpu = shares.stop()
                finally:
                    caller.close()
            for system, times, extra in (
                ("aiohttp alone, no broker", alone["aiohttp"], ["", ""]),
                ("openai SDK alone, no broker", alone["sdk"], ["", ""]),
                ("multillm", ours, [f"{published:.3f}", f"{cpu['worker']:.0f}"]),
            ):
                waves = [times[concurrency * (w + 1) - 1] for w in range(BURST_WAVES)]
                rows.append(
                    [
                        str(concurrency),
                        system,
                        " / ".join(f"{t:.2f}" for t in waves),
                        f"{bound / waves[-1]:.3f}",
                        *extra,
                    ]
                )
            verdicts += [
                verdict(f"burst: bound / last reply at {concurrency}", bound / ours[-1], 0.95, at_most=False),
                verdict(
                    f"burst: the SDK alone's last call / multillm's last reply at {concurrency}",
                    alone["sdk"][-1] / ours[-1],
                    0.95,
                    at_most=False,
                ),
            ]
    bench.purge()
    return Section(
        name="burst",
        title=f"12. A burst: {BURST_WAVES}x the concurrency at once, model latency {latency_s:g} s",
        headers=[
            "concurrency",
            "system",
            "each wave's last reply s",
            "bound / last",
            "publishing s",
            "worker CPU %",
        ],
        rows=rows,
        verdicts=verdicts,
        notes=[
            f"multillm: a fresh `worker primary --concurrency C` per row; a raw pika caller publishes "
            f"{BURST_WAVES}*C requests without waiting for confirms, then waits for every reply on direct "
            f"reply-to. Times run from the first publish. Bound: {BURST_WAVES} waves of {latency_s:g} s "
            f"= {bound:g} s.",
            "The same calls with no broker, from one asyncio process (`python -m multillm.bench.bare burst`): "
            "through the openai SDK's typed `create` over its aiohttp transport, and through aiohttp alone. "
            "Every model call of ours goes through the SDK, so the SDK alone is the floor any such worker "
            "stands on; aiohttp alone shows what this machine allows Python at all.",
            "The model is `multillm/bench/foreign_mock.py` (aiohttp.web), not our mock.",
        ],
    )


def _calls_alone(mock_url: str, client: str, concurrency: int, total: int) -> list[float]:
    """`bare burst` in a process of its own: each call's end in seconds from the first."""
    command = python_module(
        "multillm.bench.bare", "burst", "--mock-url", mock_url, "--client", client,
        "--concurrency", str(concurrency), "--requests", str(total),
    )  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return msgspec.json.decode(done.stdout, type=list[float])

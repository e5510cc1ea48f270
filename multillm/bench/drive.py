"""Sending requests and timing them: one at a time, or with a fixed number in flight."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

import msgspec

from multillm.producers import Client, make_request
from multillm.quantiles import nearest_rank
from multillm.schemas import V1CreateMultiLLMChatCompletionRequest

PROMPT = "Say something short about message queues."

# Threads publishing requests; the Client's producer pool has 8 producers.
SENDERS = 4

MakeRequest = Callable[[int], V1CreateMultiLLMChatCompletionRequest]


class Run(msgspec.Struct):
    """What a batch of requests gave: how many, how fast, and each one's latency."""

    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    # When each reply came, in seconds from the first publish, in order.
    finished_at: list[float] = msgspec.field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def steady_per_second(self) -> float:
        """Replies per second between the 20th and the 80th percentile of reply times.

        Leaves out the start (slots still filling) and the end (slots emptying, nothing
        sent any more), which with 1 s calls are a large part of a short run.
        """
        if len(self.finished_at) < 10:
            return self.per_second
        first, last = int(len(self.finished_at) * 0.2), int(len(self.finished_at) * 0.8)
        span = self.finished_at[last] - self.finished_at[first]
        return (last - first) / span if span > 0 else self.per_second


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0..1) of unsorted `values`; 0 for no values."""
    return nearest_rank(sorted(values), q) if values else 0.0


def requests_for(models: list[str]) -> MakeRequest:
    return lambda i: make_request(models, f"{PROMPT} #{i}")


def keep_in_flight(
    client: Client,
    make: MakeRequest,
    *,
    total: int,
    in_flight: int,
    timeout: float = 300.0,
    ramp_seconds: float = 0.0,
) -> Run:
    """Send `total` requests, never more than `in_flight` unanswered; time each from publish to reply.

    With `ramp_seconds`, the first `in_flight` requests are spread over that time
    rather than sent at once: with slow calls, all of them would otherwise finish
    together and restart together, in waves that no real traffic makes.
    """
    slots = threading.BoundedSemaphore(in_flight)
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0
    finished = threading.Event()

    finished_at: list[float] = []

    def on_done(future: Future[Any], *, sent: float) -> None:
        nonlocal errors
        now = time.perf_counter()
        elapsed = (now - sent) * 1000
        with lock:
            finished_at.append(now - started)
            if future.exception() is None:
                latencies.append(elapsed)
            else:
                errors += 1
            if len(latencies) + errors == total:
                finished.set()
        slots.release()

    counter = itertools.count()

    def send() -> None:
        # Several threads publish, as a service's request handlers would: one publish waits
        # for its confirm, and one thread alone could not keep hundreds of requests in flight.
        while (i := next(counter)) < total:
            if not slots.acquire(timeout=timeout):
                return
            if i < in_flight and ramp_seconds:
                time.sleep(max(0.0, started + ramp_seconds * i / in_flight - time.perf_counter()))
            sent = time.perf_counter()
            future = client.submit(make(i), timeout=timeout)
            future.add_done_callback(partial(on_done, sent=sent))

    started = time.perf_counter()
    senders = [threading.Thread(target=send, daemon=True) for _ in range(SENDERS)]
    for sender in senders:
        sender.start()
    if not finished.wait(timeout):
        raise TimeoutError(f"only {len(latencies) + errors} of {total} replies within {timeout:g}s")
    seconds = time.perf_counter() - started
    return Run(requests=total, errors=errors, seconds=seconds, latencies_ms=latencies, finished_at=sorted(finished_at))


def windowed(submit: Callable[[int], Callable[[], object]], *, total: int, in_flight: int) -> Run:
    """The same for a peer whose results are waited on one by one (Celery's AsyncResult.get)."""
    latencies: list[float] = []
    window: list[tuple[float, Callable[[], object]]] = []
    started = time.perf_counter()
    sent = 0
    while sent < total or window:
        while sent < total and len(window) < in_flight:
            window.append((time.perf_counter(), submit(sent)))
            sent += 1
        at, wait = window.pop(0)
        wait()
        latencies.append((time.perf_counter() - at) * 1000)
    return Run(requests=total, errors=0, seconds=time.perf_counter() - started, latencies_ms=latencies)


def interleaved(
    ours: Callable[[int], object], floor: Callable[[int], object], count: int
) -> tuple[list[float], list[float]]:
    """The wall time (ms) of each, sampled alternately (`alternately`)."""
    return alternately(_timed(ours), _timed(floor), count)


def alternately(
    ours: Callable[[int], float], floor: Callable[[int], float], count: int
) -> tuple[list[float], list[float]]:
    """Alternate the two sample by sample (and which goes first), so drift hits both alike; each
    returns its sample (ms)."""
    for i in range(min(20, count)):  # warm connections and caches on both sides
        ours(i)
        floor(i)
    samples: tuple[list[float], list[float]] = ([], [])
    for i in range(count):
        order = (0, 1) if i % 2 else (1, 0)
        for side in order:
            samples[side].append((ours, floor)[side](i))
    return samples


def _timed(run: Callable[[int], object]) -> Callable[[int], float]:
    def timed(i: int) -> float:
        started = time.perf_counter()
        run(i)
        return (time.perf_counter() - started) * 1000

    return timed

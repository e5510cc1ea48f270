"""Sending requests and timing them: one at a time, or with a fixed number in flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

import msgspec

from multillm.producers import Client, make_request
from multillm.schemas import V1CreateMultiLLMChatCompletionRequest

PROMPT = "Say something short about message queues."

MakeRequest = Callable[[int], V1CreateMultiLLMChatCompletionRequest]


class Run(msgspec.Struct):
    """What a batch of requests gave: how many, how fast, and each one's latency."""

    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) by the nearest-rank method; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def requests_for(models: list[str]) -> MakeRequest:
    return lambda i: make_request(models, f"{PROMPT} #{i}")


def keep_in_flight(
    client: Client,
    make: MakeRequest,
    *,
    total: int,
    in_flight: int,
    timeout: float = 300.0,
) -> Run:
    """Send `total` requests, never more than `in_flight` unanswered; time each from publish to reply."""
    slots = threading.BoundedSemaphore(in_flight)
    lock = threading.Lock()
    latencies: list[float] = []
    errors = 0
    finished = threading.Event()

    def on_done(future: Future[Any], *, sent: float) -> None:
        nonlocal errors
        elapsed = (time.perf_counter() - sent) * 1000
        with lock:
            if future.exception() is None:
                latencies.append(elapsed)
            else:
                errors += 1
            if len(latencies) + errors == total:
                finished.set()
        slots.release()

    started = time.perf_counter()
    for i in range(total):
        if not slots.acquire(timeout=timeout):
            raise TimeoutError(f"no reply within {timeout:g}s with {in_flight} requests in flight")
        sent = time.perf_counter()
        future = client.submit(make(i), timeout=timeout)
        future.add_done_callback(partial(on_done, sent=sent))
    if not finished.wait(timeout):
        raise TimeoutError(f"only {len(latencies) + errors} of {total} replies within {timeout:g}s")
    return Run(requests=total, errors=errors, seconds=time.perf_counter() - started, latencies_ms=latencies)


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

"""`LoopLag` on a real event loop: a loop kept busy is measured and reported; an idle one is not."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from multillm.workers.loop_lag import LoopLag


async def _run(lag: LoopLag, seconds: float, *, block: float = 0.0, every: float = 0.0) -> None:
    """Run the loop for `seconds` with `lag` started, stalling it for `block` seconds every `every` seconds."""
    lag.start()
    try:
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            if block:
                time.sleep(block)  # a stall: CPU-bound work on the loop's thread
            await asyncio.sleep(every or 0.01)
    finally:
        lag.stop()


def test_a_stalled_loop_is_measured_and_the_worker_warns() -> None:
    lags: list[float] = []
    lag = LoopLag(lags.append, concurrency=512, interval=0.01, window=5, late=0.05, late_share=0.5, repeat=0)
    with capture_logs() as logs:
        asyncio.run(_run(lag, 1.0, block=0.12, every=0.001))
    # A timer that fell due during a stall ran at least that stall's rest late: nearly all of them
    # (one may share a turn with the sleep that ends a stall, on a machine that paused the test).
    late = [seconds for seconds in lags if seconds >= 0.05]
    assert lags and len(late) >= len(lags) / 2
    warnings = [entry for entry in logs if entry["event"] == "worker.saturated"]
    assert 1 <= len(warnings) <= len(lags) // 5
    first = warnings[0]
    assert first["log_level"] == "warning"
    assert first["concurrency"] == 512
    assert first["lag_max_ms"] >= 50
    assert "start another worker process" in first["advice"]


def test_a_saturated_worker_says_so_once_in_a_while() -> None:
    lags: list[float] = []
    lag = LoopLag(lags.append, concurrency=512, interval=0.01, window=2, late=0.05, late_share=0.5, repeat=60)
    with capture_logs() as logs:
        asyncio.run(_run(lag, 0.6, block=0.1, every=0.001))
    assert len(lags) >= 4  # two windows or more, both late
    assert len([entry for entry in logs if entry["event"] == "worker.saturated"]) == 1


def test_an_idle_loop_does_not_warn() -> None:
    lags: list[float] = []
    # A generous threshold: an idle loop on a loaded test machine is still never half a second late.
    lag = LoopLag(lags.append, concurrency=4, interval=0.01, window=5, late=0.5, late_share=0.5)
    with capture_logs() as logs:
        asyncio.run(_run(lag, 0.5))
    assert len(lags) >= 5
    assert all(lag >= 0 for lag in lags)
    assert not [entry for entry in logs if entry["event"] == "worker.saturated"]


def test_a_failing_observer_does_not_stop_the_timer() -> None:
    ticks: list[float] = []

    def observe(seconds: float) -> None:
        ticks.append(seconds)
        raise RuntimeError("metrics are broken")

    lag = LoopLag(observe, concurrency=1, interval=0.01, window=100)
    with capture_logs() as logs:
        asyncio.run(_run(lag, 0.3))
    assert len(ticks) >= 3
    assert any(entry["event"] == "loop_lag.observe_failed" for entry in logs)


def test_stop_ends_the_ticks() -> None:
    ticks: list[float] = []

    async def main() -> int:
        lag = LoopLag(ticks.append, concurrency=1, interval=0.01)
        lag.start()
        await asyncio.sleep(0.1)
        lag.stop()
        seen = len(ticks)
        await asyncio.sleep(0.1)
        return seen

    seen = asyncio.run(main())
    assert seen >= 1
    assert len(ticks) == seen

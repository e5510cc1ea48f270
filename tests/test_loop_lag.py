"""`LoopLag` on a real event loop: a loop kept busy is measured and reported; an idle one is not.

The loops are driven by a count of stalls or ticks, not by wall time, so that a slow
machine changes how long a test takes, not what it sees.
"""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from multillm.workers.loop_lag import LoopLag


async def _stall(lag: LoopLag, lags: list[float], *, ticks: int, block: float) -> None:
    """Stall the loop for `block` seconds at a time, with `lag` running, until it has ticked `ticks` times."""
    lag.start()
    try:
        while len(lags) < ticks:
            time.sleep(block)  # CPU-bound work on the loop's thread
            await asyncio.sleep(0.001)
    finally:
        lag.stop()


async def _idle(lag: LoopLag, lags: list[float], *, ticks: int) -> None:
    lag.start()
    try:
        while len(lags) < ticks:
            await asyncio.sleep(0.01)
    finally:
        lag.stop()


def test_a_stalled_loop_is_measured_and_the_worker_warns() -> None:
    lags: list[float] = []
    lag = LoopLag(lags.append, concurrency=512, interval=0.01, window=5, late=0.05, late_share=0.5, repeat=0)
    with capture_logs() as logs:
        asyncio.run(_stall(lag, lags, ticks=10, block=0.12))
    # A timer that fell due during a stall ran at least that stall's rest late: nearly all of them
    # (one may share a turn with the sleep that ends a stall, on a machine that paused the test).
    late = [seconds for seconds in lags if seconds >= 0.05]
    assert len(late) >= len(lags) / 2
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
        asyncio.run(_stall(lag, lags, ticks=12, block=0.1))  # six windows, most of them late
    assert len([entry for entry in logs if entry["event"] == "worker.saturated"]) == 1


def test_an_idle_loop_does_not_warn() -> None:
    lags: list[float] = []
    # A generous threshold: an idle loop on a loaded test machine is still never half a second late.
    lag = LoopLag(lags.append, concurrency=4, interval=0.01, window=5, late=0.5, late_share=0.5)
    with capture_logs() as logs:
        asyncio.run(_idle(lag, lags, ticks=20))
    assert not [entry for entry in logs if entry["event"] == "worker.saturated"]


def test_a_failing_observer_does_not_stop_the_timer_and_is_logged_once() -> None:
    ticks: list[float] = []

    def observe(seconds: float) -> None:
        ticks.append(seconds)
        raise RuntimeError("metrics are broken")

    lag = LoopLag(observe, concurrency=1, interval=0.01, window=100)
    with capture_logs() as logs:
        asyncio.run(_idle(lag, ticks, ticks=5))
    assert len([entry for entry in logs if entry["event"] == "loop_lag.observe_failed"]) == 1


def test_start_twice_is_one_timer_and_stop_ends_it() -> None:
    ticks: list[float] = []

    async def main() -> int:
        lag = LoopLag(ticks.append, concurrency=1, interval=0.01)
        lag.start()
        lag.start()
        while len(ticks) < 3:
            await asyncio.sleep(0.01)
        lag.stop()
        seen = len(ticks)
        await asyncio.sleep(0.1)
        return seen

    seen = asyncio.run(main())
    assert len(ticks) == seen

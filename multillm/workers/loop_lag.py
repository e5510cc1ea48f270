"""How late the event loop runs a timer: the sign that a worker process needs more CPU than it gets.

A worker's calls mostly wait on the network, so one process keeps hundreds in
flight, until its one event-loop thread has work all the time (docs/benchmarks.md:
about 500 one-second calls a second on a 2-core machine). Past that point every step
of every request waits for its turn on the loop: latency grows, and throughput stops
growing with `--concurrency`. The process's CPU share does not show it, since the
thread may be waiting for a core it shares with the broker or the database; a timer's
lateness does.

Every `interval` the loop is asked to wake up, and how late it did goes to
`multillm_event_loop_lag_seconds`. When, over a window of ticks, more than
`late_share` of them were later than `late`, the worker says so (`worker.saturated`,
at most once every `REPEAT_SECONDS`), with what to do about it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import structlog

log = structlog.get_logger(__name__)

INTERVAL: Final = 0.25
# 10 s on a loop with time to spare; longer on one that lags.
WINDOW_TICKS: Final = 40
# Half the ticks later than this: the loop seldom gets round to new work at once, and each of
# a request's turns on it (delivery, the call's send and its answer, the record, the reply's
# confirm) waits about as long. A loop with room to spare runs its timer within a millisecond
# or two (bench, one-second calls: p50 0.7 ms at 128 in flight; 9 ms at 512, where one
# process on 2 shared cores fell to 0.88 of what 512 calls allow).
LATE: Final = 0.005
LATE_SHARE: Final = 0.5
# A worker that stays short of CPU says so once a minute, not every window.
REPEAT_SECONDS: Final = 60.0


class LoopLag:
    """Measures the running loop's lag from `start()` to `stop()`; use it from that loop.

    Args:
        observe: told every tick's lag, in seconds (the metric).
        concurrency: the worker's `--concurrency`, named in the warning.
        interval, window, late, late_share, repeat: see the module docstring; tests shorten them.
    """

    def __init__(
        self,
        observe: Callable[[float], None],
        concurrency: int,
        *,
        interval: float = INTERVAL,
        window: int = WINDOW_TICKS,
        late: float = LATE,
        late_share: float = LATE_SHARE,
        repeat: float = REPEAT_SECONDS,
    ) -> None:
        self._observe = observe
        self._concurrency = concurrency
        self._interval = interval
        self._window = window
        self._late = late
        self._late_share = late_share
        self._repeat = repeat
        self._quiet_until = float("-inf")
        self._lags: list[float] = []
        self._timer: asyncio.TimerHandle | None = None
        self._observe_failed = False

    def start(self) -> None:
        """Start ticking; a second call does nothing (one chain of timers, which `stop` ends)."""
        if self._timer is None:
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # From now, not from the last due time: after a long stall, one late tick is the truth;
        # a burst of catch-up ticks would only dilute it.
        due = loop.time() + self._interval
        self._timer = loop.call_at(due, self._tick, loop, due)

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        # The next tick first: nothing below may end the chain of timers.
        self._schedule(loop)
        lag = max(0.0, loop.time() - due)
        try:
            self._observe(lag)
        except Exception:
            if not self._observe_failed:  # once: four tracebacks a second would drown the log
                self._observe_failed = True
                log.exception("loop_lag.observe_failed")
        self._lags.append(lag)
        if len(self._lags) >= self._window:
            self._judge(loop.time())

    def _judge(self, now: float) -> None:
        lags, self._lags = sorted(self._lags), []
        late = sum(1 for lag in lags if lag > self._late)
        if late <= self._late_share * len(lags) or now < self._quiet_until:
            return
        self._quiet_until = now + self._repeat
        log.warning(
            "worker.saturated",
            late_ticks=f"{late}/{len(lags)}",
            lag_p50_ms=round(lags[len(lags) // 2] * 1000, 1),
            lag_max_ms=round(lags[-1] * 1000, 1),
            concurrency=self._concurrency,
            advice=(
                f"the event loop ran {late} of {len(lags)} timers more than {self._late * 1000:g} ms late:"
                " this process is short of CPU and every request waits for its turn; start another"
                " worker process (on a core of its own), or lower --concurrency"
            ),
        )


__all__ = ["LoopLag"]

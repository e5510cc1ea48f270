"""Admission of work: at most `concurrency` model calls at once, the rest waiting in order.

A work holds its call slot until its model call is over (`release`), not until it is
settled: when a wave of calls returns together, the next calls begin before the wave's
records and replies are written, rather than after (docs/benchmarks.md, "A burst").
The prefetch is twice the concurrency, so deliveries wait here for a call slot. Those
that have not begun when the worker stops go back to the queue at once, for another
worker; those of a connection that is gone are dropped (the broker has put them back).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from multillm.workers.messages import Delivery


class Admission:
    """Runs each admitted coroutine as a task once a call slot is free; on the event loop only."""

    def __init__(self, concurrency: int) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        # Deliveries of the current connection waiting for a slot, by tag.
        self._waiting: dict[int, Delivery] = {}
        # Tasks started and not finished, whatever connection they came on; the loop keeps
        # only weak references to tasks, so these keep them alive too.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """Tasks not finished: waiting for a slot or working."""
        return len(self._tasks)

    def admit(self, delivery: Delivery, work: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        """Run `work(release)` once a slot is free, unless `delivery` is taken back first (`take_waiting`,
        `forget`); the slot is free again at `release()` or when the work ends, whichever comes first."""
        self._waiting[delivery.tag] = delivery
        task = asyncio.get_running_loop().create_task(self._run(delivery, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, delivery: Delivery, work: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        await self._slots.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._slots.release()

        try:
            if self._waiting.get(delivery.tag) is not delivery:
                return  # taken back while it waited: requeued on a stop, or its connection is gone
            del self._waiting[delivery.tag]
            await work(release)
        finally:
            release()

    def take_waiting(self) -> list[Delivery]:
        """The deliveries still waiting for a slot, which will now never begin here."""
        waiting, self._waiting = list(self._waiting.values()), {}
        return waiting

    def forget(self) -> None:
        """The connection is gone: nothing waiting may begin (the broker redelivers it)."""
        self._waiting.clear()

    async def cancel(self) -> None:
        """Cancel every task (calls still running past the grace period) and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self, seconds: float) -> bool:
        """Wait up to `seconds` for every task to finish; True if they did."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=seconds)
        return not self._tasks

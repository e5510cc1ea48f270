"""The event loop where a worker's model calls run: one asyncio loop on a thread of its own.

A model call spends nearly all its life waiting for the model, so a worker keeps
`--concurrency` of them in flight as tasks on one loop instead of one blocked
thread each: with 512 threads the GIL hand-overs alone took a third of the
worker's CPU (docs/benchmarks.md). What blocks (the sink's writes) goes to the
loop's default executor, a few threads, through `asyncio.to_thread`.

The connection's thread starts work with `start_soon`; as with `Handback`, one
wake-up of the loop starts everything queued meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
Job = Callable[[], Coroutine[Any, Any, None]]


class CallLoop:
    """An asyncio loop running on a daemon thread until `stop`.

    Daemon, because a call that outlives the shutdown grace period must not hold
    the process open: its message is redelivered to another worker.

    Args:
        name: the loop thread's name.
        blocking_threads: threads of the default executor, where `asyncio.to_thread` runs.
    """

    def __init__(self, name: str, blocking_threads: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(ThreadPoolExecutor(blocking_threads, thread_name_prefix=f"{name}-blocking"))
        self._lock = threading.Lock()
        self._ready: list[Job] = []
        self._wake_pending = False
        # The loop keeps only weak references to its tasks; these keep them alive until done.
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def start_soon(self, job: Job) -> None:
        """Run `job()` as a task on the loop; from any thread. Exceptions are the job's to handle."""
        with self._lock:
            self._ready.append(job)
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._drain)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and wait for its result; from any other thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop; tasks still running are left where they are (the process is ending)."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready, self._wake_pending = self._ready, [], False
        for job in ready:
            task = self._loop.create_task(job())
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A job that forgot to catch: say so, rather than asyncio's "never retrieved" at exit.
            log.error("loop.task_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)

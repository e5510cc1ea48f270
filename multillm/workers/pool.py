"""A fixed pool of threads for model calls: all started at once, fed through one `SimpleQueue`.

`concurrent.futures.ThreadPoolExecutor` builds a Future (and its Condition) for
every task and takes a semaphore to decide whether to start a thread; with 512
threads that was a fifth of the connection thread's time (py-spy). The worker
needs neither: a task's result goes back through `Handback`, and the number of
threads is known when the worker starts.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

Task = Callable[[], None]


class ThreadPool:
    """`size` daemon threads that run submitted tasks in order of submission.

    Daemon threads, because a call that outlives the shutdown grace period must not
    hold the process open: its message is redelivered to another worker.
    """

    def __init__(self, size: int, name: str) -> None:
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, task: Task) -> None:
        """Run `task` on a pool thread; from any thread. Exceptions are the task's to handle."""
        self._tasks.put(task)

    def shutdown(self) -> None:
        """Drop the tasks not started yet (their messages are redelivered) and let the threads end."""
        while True:
            try:
                self._tasks.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._tasks.put(None)

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception:  # a task that forgot to catch must not take its thread down
                log.exception("pool.task_failed")

"""A progress bar for long work of the commands (the demo, the chaos soak): on a terminal only,
so that logs and pipes stay plain."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yields `update(completed)`: a rich bar on stderr when stderr is a terminal, a no-op otherwise.

    The bar disappears when done (what was done is printed by the caller), and
    nothing of rich is imported when it would not be shown.
    """
    if not sys.stderr.isatty():
        yield lambda completed: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda completed: bar.update(task, completed=completed)

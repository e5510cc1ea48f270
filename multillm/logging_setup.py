"""structlog configuration. Only the CLI calls `configure_logging`; library code only binds context.

Code that services import (the producers, the mock) logs through `get_logger`, which is
silent unless the application configured logging, as a library should be: structlog's
defaults would print every debug line of a `Client` to the service's stdout.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from multillm import tracing


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written, not when logging was configured.

    A program that swaps stderr after configuring (pytest's capture does, per test)
    would otherwise leave every logger writing to a closed file, and a log line in
    an `except` block would raise in its place.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """JSON lines when not on a terminal (production), coloured console lines on one.

    Args:
        level: the lowest level printed.
        json: force JSON (True) or console (False); None decides by whether stderr is a tty.
    """
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            tracing.log_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # pika and kombu log through the standard library; keep their noise at warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    # pika logs the start of every returned message's body at WARNING, and a fan-out
    # copy carries its model's api key: we log returns ourselves, without bodies.
    logging.getLogger("pika").setLevel(logging.ERROR)


def _as_stdlib_call(_logger: object, _method: str, event_dict: structlog.typing.EventDict) -> dict[str, Any]:
    """The arguments of the stdlib call: `event key=value ...`, and the exception if any."""
    exc_info = event_dict.pop("exc_info", None)
    event = event_dict.pop("event", "")
    text = " ".join([str(event), *(f"{key}={value!r}" for key, value in event_dict.items())])
    return {"msg": text, "exc_info": exc_info}


_TO_STDLIB: list[structlog.typing.Processor] = [
    structlog.stdlib.filter_by_level,  # first: a disabled level costs one isEnabledFor
    structlog.contextvars.merge_contextvars,
    _as_stdlib_call,
]


class LibraryLogger:
    """A library module's logger; where a line goes is decided when it is logged.

    - structlog configured (by the application, or by the CLI's `configure_logging`): through
      structlog, exactly as `structlog.get_logger(name)`, so `structlog.testing.capture_logs`
      sees it too;
    - otherwise: to the standard library's logger `name` as `event key=value ...`: shown once
      the application configures the standard library (`logging.basicConfig(level=...)`),
      and nowhere before, since the `multillm` logger has a `NullHandler` (see `multillm/__init__.py`).
    """

    __slots__ = ("_stdlib", "_structlog")

    def __init__(self, name: str) -> None:
        self._structlog: Any = structlog.get_logger(name)
        self._stdlib: Any = structlog.wrap_logger(
            logging.getLogger(name), processors=_TO_STDLIB, wrapper_class=structlog.stdlib.BoundLogger
        )

    def _target(self) -> Any:
        return self._structlog if structlog.is_configured() else self._stdlib

    def debug(self, event: str, **fields: Any) -> None:
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._target().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._target().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """`error` with the exception being handled."""
        self._target().exception(event, **fields)


def get_logger(name: str) -> LibraryLogger:
    """The logger of a module that services import: `log = get_logger(__name__)`."""
    return LibraryLogger(name)

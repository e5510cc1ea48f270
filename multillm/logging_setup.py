"""structlog configuration. Only the CLI calls `configure_logging`; library code only binds context."""

from __future__ import annotations

import logging
import sys

import structlog


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

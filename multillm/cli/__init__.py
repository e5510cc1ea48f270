"""`multillm ...`: run workers, send a request, run the demo and the mock, read the logs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import get_args

from multillm.bench import SCENARIOS
from multillm.cli import commands
from multillm.config import DEFAULT_MOCK_PORT, DEFAULT_SINK_URL, ENV_SINK_URL
from multillm.errors import ConfigError
from multillm.logging_setup import configure_logging
from multillm.schemas import Mode
from multillm.sinks.query import parse_bound

__all__ = ["main"]

ENV_LOG_LEVEL = "MULTILLM_LOG_LEVEL"
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multillm", description=__doc__)
    parser.add_argument("--config", help="settings file (default: ./multillm.toml if present)")
    parser.add_argument(
        "--log-level",
        default=os.environ.get(ENV_LOG_LEVEL, "info").strip().lower() or "info",
        choices=_LOG_LEVELS,
        help=f"lowest level logged (default: ${ENV_LOG_LEVEL}, else info)",
    )
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a terminal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = sub.add_parser("worker", help="run a worker until SIGTERM")
    kinds = worker.add_subparsers(dest="kind", required=True, metavar="KIND")
    primary = kinds.add_parser("primary", help="serve multillm.requests: call the primary model, reply")
    model = kinds.add_parser("model", help="serve multillm.model.<NAME>: call one model, write its record")
    model.add_argument("--model", required=True, help="provider/model, e.g. openai/gpt-4o-mini")
    for p in (primary, model):
        p.add_argument("--concurrency", type=_positive, default=4, help="model calls in flight (default 4)")
        p.add_argument(
            "--metrics-port",
            type=_port,
            help="serve Prometheus metrics at http://0.0.0.0:P/metrics (0: a free port, logged); default: none",
        )

    request = sub.add_parser("request", help="send one request, print the reply")
    request.add_argument("prompt")
    request.add_argument("--model", action="append", required=True, help="provider/model; repeat for more")
    request.add_argument("--display-model", type=int, default=0, help="index of the primary model")
    request.add_argument("--system", help="a system message before the prompt")
    request.add_argument("--timeout", type=float, default=60.0)
    request.add_argument("--json", action="store_true", help="print the reply as JSON")

    mock = sub.add_parser("mock-llm", help="an OpenAI-compatible mock server")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=DEFAULT_MOCK_PORT)
    mock.add_argument("--latency-ms", type=float, default=0.0)

    demo = sub.add_parser("demo", help="the whole pipeline end to end against the mock")
    demo.add_argument("--requests", type=_positive, default=3, help="how many requests to send")
    demo.add_argument("--latency-ms", type=float, default=150.0, help="the mock's latency")

    chaos = sub.add_parser("chaos", help="a bounded soak under faults; prints what was lost (needs rabbitmqctl)")
    chaos.add_argument("--requests", type=_positive, default=3000)
    chaos.add_argument("--duration", type=float, default=150.0, help="seconds over which requests are sent")
    chaos.add_argument("--seed", type=int, default=1)

    bench = sub.add_parser("bench", help="the benchmark: ours against the floor, a bare pika loop and Celery")
    bench.add_argument("--only", action="append", default=[], choices=list(SCENARIOS), help="repeat for more")
    bench.add_argument("--quick", action="store_true", help="every scenario for seconds only (a smoke run)")
    bench.add_argument("--output", help="write the tables into this markdown file and a PNG chart beside it")
    bench.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server on which the sink scenario may create a scratch database ('' to skip)",
    )

    logs = sub.add_parser("logs", help="read the log records in the sink")
    logs_sub = logs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = logs_sub.add_parser("list", help="the latest requests, one line each")
    listing.add_argument("--limit", type=_positive, default=20, help="at most this many requests (default 20)")
    show = logs_sub.add_parser("show", help="one request's models side by side")
    show.add_argument("request_id")
    stats = logs_sub.add_parser("stats", help="per-model count, error rate, latency percentiles, tokens")
    report = logs_sub.add_parser("report", help="a self-contained HTML page comparing the models")
    report.add_argument("--html", required=True, metavar="FILE", help="where to write the page")
    report.add_argument("--recent", type=_positive, default=20, help="side-by-side answers of this many requests")
    for p in (listing, stats, report):
        _add_filters(p)
    for p in (listing, show, stats):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    replay = logs_sub.add_parser(
        "replay-dead",
        help="write the records in multillm.dead to the sink; leave every other dead letter there",
    )
    for p in (listing, show, stats, report, replay):
        p.add_argument(
            "--sink",
            metavar="URL",
            help=f"the sink (default: ${ENV_SINK_URL}, else sink_url of the config file, else {DEFAULT_SINK_URL})",
        )
    return parser


def _add_filters(parser: argparse.ArgumentParser) -> None:
    """The record filters of `logs list|stats|report`; they all must match."""
    parser.add_argument("--mode", type=_mode, help="MODE_PROD, MODE_STAGING, MODE_TEST... (or prod, staging...)")
    parser.add_argument("--model", help="provider/model")
    parser.add_argument("--trace", help="trace id")
    parser.add_argument("--session", help="session id")
    parser.add_argument(
        "--attr", action="append", type=_attribute, metavar="KEY=VALUE", help="a log attribute; repeat for more"
    )
    parser.add_argument("--since", type=_bound, metavar="WHEN", help="created at or after (ISO date or date-time, UTC)")
    parser.add_argument(
        "--until", type=_end_bound, metavar="WHEN", help="created before (a bare date includes that day)"
    )


def _mode(text: str) -> str:
    mode = text.upper() if text.upper().startswith("MODE_") else "MODE_" + text.upper()
    if mode not in get_args(Mode):
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}: one of {', '.join(get_args(Mode))}")
    return mode


def _attribute(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _bound(text: str, *, end_of_day: bool = False) -> str:
    try:
        return parse_bound(text, end_of_day=end_of_day)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _end_bound(text: str) -> str:
    return _bound(text, end_of_day=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0 to 65535), got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.log_level not in _LOG_LEVELS:
        # argparse checks choices only for values given on the command line, not for defaults.
        parser.error(f"{ENV_LOG_LEVEL}={args.log_level!r} is not one of {', '.join(_LOG_LEVELS)}")
    configure_logging(args.log_level, args.log_json)
    try:
        return commands.dispatch(args)
    except ConfigError as exc:
        print(f"multillm: configuration error: {exc}", file=sys.stderr)
        return 2
    except commands.CommandError as exc:
        print(f"multillm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

"""`multillm ...`: run workers, send a request, run the demo and the mock, read the logs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import get_args

from multillm import contract
from multillm.bench import SCENARIOS
from multillm.cli import commands
from multillm.config import (
    DEFAULT_MOCK_LATENCY_MS,
    DEFAULT_MOCK_PORT,
    DEFAULT_MOCK_TOKEN_DELAY_MS,
    DEFAULT_SINK_URL,
    ENV_BROKER_URL,
    ENV_CONFIG,
    ENV_LOG_LEVEL,
    ENV_SINK_URL,
)
from multillm.errors import CommandError, ConfigError
from multillm.logging_setup import configure_logging
from multillm.schemas import Mode
from multillm.sinks.query import parse_bound

__all__ = ["main"]

_LOG_LEVELS = ("debug", "info", "warning", "error")

# What each variable does, for the `--help` of every command that reads it.
_ENVIRONMENT = {
    ENV_BROKER_URL: "the broker's AMQP URL (overrides broker_url)",
    ENV_SINK_URL: "the log sink's URL (overrides sink_url)",
    ENV_CONFIG: "the settings file, as multillm --config",
    ENV_LOG_LEVEL: "lowest level logged, as multillm --log-level",
}
_BROKER = (ENV_BROKER_URL, ENV_CONFIG, ENV_LOG_LEVEL)
_SINK = (ENV_SINK_URL, ENV_CONFIG, ENV_LOG_LEVEL)
_BOTH = (ENV_BROKER_URL, ENV_SINK_URL, ENV_CONFIG, ENV_LOG_LEVEL)

_MOCK_FAULTS = """\
answers: deterministic, from the model's name and the last user message
  (mock/echo -> "echo says: ...", mock/upper in capitals, mock/reverse words reversed).

fault injection, over HTTP while it runs (in Python: multillm.mock_llm.MockControl):
  POST   /_mock/faults   one model's fault, as JSON; it replaces that model's previous one
  DELETE /_mock/faults   every model answers normally again
  GET    /_mock/calls    the calls served (model, status, id, prompt); DELETE clears them
  a fault's fields: "model" (the provider-side name, echo for mock/echo, or * for every
  model without its own), "statuses" (answered in order, 0 = close the socket without
  answering), "always" (answered after them, for ever), "latency_ms", "retry_after" and
  "retry_after_ms" (headers of the error answers), "drop_connection", "echo_auth" (put the
  caller's key in the error, to test scrubbing), "error_rate" with "error_statuses" and "seed";
  for a streamed answer ("stream": true, server-sent events a word each), "token_delay_ms"
  "cut_after_tokens" (reset the connection after that many tokens) and "cut_streams" (cut only
  that many streamed answers; default every one).
  e.g. curl -X POST http://127.0.0.1:8089/_mock/faults -d '{"model": "echo", "statuses": [503, 429]}'
"""


def _environment(*names: str) -> str:
    """The epilog naming the environment variables a command honours."""
    lines = [f"  {name:<22}{_ENVIRONMENT[name]}" for name in names]
    return "environment:\n" + "\n".join(lines)


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    env: Sequence[str],
    epilog: str = "",
) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with `epilog` and the environment variables it honours."""
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=(epilog.rstrip() + "\n\n" if epilog else "") + _environment(*env),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multillm",
        description=__doc__,
        epilog=_environment(*_BOTH),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help=f"settings file (default: ${ENV_CONFIG}, else ./multillm.toml if present)")
    parser.add_argument(
        "--log-level",
        default=os.environ.get(ENV_LOG_LEVEL, "info").strip().lower() or "info",
        choices=_LOG_LEVELS,
        help=f"lowest level logged (default: ${ENV_LOG_LEVEL}, else info)",
    )
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a terminal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = _command(sub, "worker", "run a worker until SIGTERM", _BOTH)
    kinds = worker.add_subparsers(dest="kind", required=True, metavar="KIND")
    primary = _command(kinds, "primary", "serve multillm.requests: call the primary model, reply", _BOTH)
    model = _command(kinds, "model", "serve multillm.model.<NAME>: call one model, write its record", _BOTH)
    model.add_argument("--model", required=True, help="provider/model, e.g. openai/gpt-4o-mini")
    judge = _command(
        kinds,
        "judge",
        f"serve {contract.JUDGE_QUEUE}: score each non-primary answer against the primary's",
        _BOTH,
        f"each non-primary ok record gets one `{contract.JUDGE_SCORE_NAME}` score (win, tie or loss against\n"
        "the primary's answer), from two calls of the judge model, one with each answer first;\n"
        "a verdict that changes with the order is a tie. Records written before the first judge\n"
        "started are not judged. The prompt is `[judge] prompt` in the config file.",
    )
    judge.add_argument("--model", required=True, help="the judge: provider/model, e.g. openai/gpt-4o")
    judge.add_argument(
        "--sample",
        type=_rate,
        default=1.0,
        metavar="RATE",
        help="judge this fraction of requests, chosen by request id (0 to 1; default 1: all)",
    )
    for p in (primary, model, judge):
        p.add_argument("--concurrency", type=_positive, default=4, help="model calls in flight (default 4)")
        p.add_argument(
            "--metrics-port",
            type=_port,
            help="serve Prometheus metrics at http://0.0.0.0:P/metrics (0: a free port, logged); default: none",
        )

    request = _command(
        sub,
        "request",
        "send one request, print the reply",
        _BROKER,
        "prints the primary model's answer on stdout; on stderr, its log id and the request id\n"
        "that `multillm logs show` takes. Exits 1 when the pipeline answers with an error.",
    )
    request.add_argument("prompt", help="the user message sent to every model")
    request.add_argument(
        "--model", action="append", required=True, help="provider/model, e.g. mock/echo; repeat for more"
    )
    request.add_argument(
        "--display-model",
        type=int,
        default=0,
        metavar="INDEX",
        help="which --model (0 = the first) is the primary, whose answer is the reply (default 0)",
    )
    request.add_argument("--system", help="a system message before the prompt")
    request.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="how long to wait for the reply (default 60)"
    )
    request.add_argument("--json", action="store_true", help="print the reply as JSON")
    request.add_argument(
        "--stream",
        action="store_true",
        help="print the primary's answer as it is written (with --json: a JSON line per delta, then the reply)",
    )

    mock = _command(sub, "mock-llm", "an OpenAI-compatible mock server", (ENV_LOG_LEVEL,), _MOCK_FAULTS)
    mock.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    mock.add_argument(
        "--port",
        type=int,
        default=DEFAULT_MOCK_PORT,
        help=f"port to bind, 0 for a free one (default {DEFAULT_MOCK_PORT})",
    )
    mock.add_argument(
        "--latency-ms",
        type=float,
        default=DEFAULT_MOCK_LATENCY_MS,
        metavar="MS",
        help=f"delay before every answer, unless a fault sets another (default {DEFAULT_MOCK_LATENCY_MS:g})",
    )
    mock.add_argument(
        "--token-delay-ms",
        type=float,
        default=DEFAULT_MOCK_TOKEN_DELAY_MS,
        metavar="MS",
        help="delay before each token of a streamed answer, unless a fault sets another"
        f" (default {DEFAULT_MOCK_TOKEN_DELAY_MS:g})",
    )

    demo = _command(sub, "demo", "the whole pipeline end to end against the mock", _BOTH)
    demo.add_argument("--requests", type=_positive, default=3, help="how many requests to send (default 3)")
    demo.add_argument(
        "--latency-ms",
        type=float,
        default=DEFAULT_MOCK_LATENCY_MS,
        help=f"the mock's latency (default {DEFAULT_MOCK_LATENCY_MS:g})",
    )

    chaos = _command(sub, "chaos", "a bounded soak under faults; prints what was lost (needs rabbitmqctl)", _BROKER)
    chaos.add_argument("--requests", type=_positive, default=3000, help="how many requests to send (default 3000)")
    chaos.add_argument(
        "--duration", type=float, default=150.0, help="seconds over which requests are sent (default 150)"
    )
    chaos.add_argument("--seed", type=int, default=1, help="seed of the random faults (default 1)")
    chaos.add_argument(
        "--cluster",
        action="store_true",
        help="run on the local three-node cluster (scripts/cluster.sh; started if down) and kill its nodes too",
    )

    bench = _command(sub, "bench", "the benchmark: ours against the floor, a bare pika loop and Celery", _BROKER)
    bench.add_argument(
        "--only", action="append", default=[], choices=list(SCENARIOS), help="repeat for more (default: every scenario)"
    )
    bench.add_argument("--quick", action="store_true", help="every scenario for seconds only (a smoke run)")
    bench.add_argument("--output", help="write the tables into this markdown file and a PNG chart beside it")
    bench.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server on which the sink scenario may create a scratch database ('' to skip; default: the local one)",
    )

    replay = _command(
        sub,
        "replay",
        "send the logged input of the requests the filters select to other models, through their queues",
        _BOTH,
        f"each record it makes carries log attribute {contract.ATTR_REPLAY_OF} (the original request's id);\n"
        "a request the model has answered before (in the request or by a replay) is skipped.\n"
        "Compare with `multillm logs compare`.",
    )
    replay.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        help="provider/model to replay to (a model worker must serve it); repeat for more",
    )
    _add_filters(replay, model_option="--from-model")
    replay.add_argument("--limit", type=_positive, help="only the latest this many requests")
    replay.add_argument("--rate", type=float, metavar="N", help="at most N requests a second (default: no limit)")
    replay.add_argument("--dry-run", action="store_true", help="count what would be sent, send nothing")

    logs = _command(sub, "logs", "read the log records in the sink", _SINK)
    logs_sub = logs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = _command(logs_sub, "list", "the latest requests, one line each", _SINK)
    listing.add_argument("--limit", type=_positive, default=20, help="at most this many requests (default 20)")
    show = _command(logs_sub, "show", "one request's models side by side", _SINK)
    show.add_argument("request_id", help="the id `multillm request` prints, or one from `logs list`")
    stats = _command(logs_sub, "stats", "per-model count, error rate, latency percentiles, tokens", _SINK)
    comparing = _command(
        logs_sub,
        "compare",
        "may we move from the baseline to the candidate? their records of the same requests, side by side",
        _SINK,
        "pairs each request's (or its replay's) records of the two models; the judge's verdicts\n"
        "(`multillm worker judge`) count where one of the two is the request's primary.",
    )
    comparing.add_argument("--baseline", required=True, metavar="MODEL", help="the model you use now")
    comparing.add_argument("--candidate", required=True, metavar="MODEL", help="the model you consider")
    comparing.add_argument("--judge", metavar="MODEL", help="whose verdicts, when several judges scored")
    _add_filters(comparing, model_option=None)
    report = _command(logs_sub, "report", "a self-contained HTML page comparing the models", _SINK)
    report.add_argument("--html", required=True, metavar="FILE", help="where to write the page")
    report.add_argument(
        "--recent", type=_positive, default=20, help="side-by-side answers of this many requests (default 20)"
    )
    report.add_argument(
        "--baseline", metavar="MODEL", help="compare against this model (default: the one most often primary)"
    )
    report.add_argument("--candidate", metavar="MODEL", help="compare only this model (default: every other one)")
    report.add_argument("--judge", metavar="MODEL", help="whose verdicts, when several judges scored")
    for p in (listing, stats, report):
        _add_filters(p)
    for p in (listing, show, stats, comparing):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    replay_dead = _command(
        logs_sub,
        "replay-dead",
        f"write the records in {contract.DEAD_QUEUE} to the sink; leave every other dead letter there",
        _BOTH,
    )
    score = _command(
        logs_sub,
        "score",
        f"score a record: publish a V1Score to {contract.SCORE_QUEUE}, which the primary workers write to the sink",
        _BROKER,
        epilog="user feedback: --name feedback --label up (or down)\n"
        'a number:      --name quality --value 0.8 --comment "cites its source"',
    )
    score.add_argument("log_id", help="the record's log id (a reply's `id` is the primary's; `logs show --json`)")
    score.add_argument("--name", required=True, help="what is scored: feedback, quality, ...")
    given = score.add_mutually_exclusive_group(required=True)
    given.add_argument("--label", help="a label: up or down for feedback, any text for other names")
    given.add_argument("--value", type=float, help="a finite number")
    score.add_argument("--comment", help="why")
    score.add_argument("--source", help="who scores (part of the derived score id: one score per record, name, source)")
    score.add_argument("--request-id", help="the request of the record, stored beside the score")
    for p in (listing, show, stats, comparing, report, replay_dead, replay):
        p.add_argument(
            "--sink",
            metavar="URL",
            help=f"the sink (default: ${ENV_SINK_URL}, else sink_url of the config file, else {DEFAULT_SINK_URL})",
        )
    return parser


def _add_filters(parser: argparse.ArgumentParser, model_option: str | None = "--model") -> None:
    """The record filters of `logs list|stats|compare|report` and `replay`; they all must match.
    `model_option`: the option that selects one model's records (None: none)."""
    parser.add_argument("--mode", type=_mode, help="MODE_PROD, MODE_STAGING, MODE_TEST... (or prod, staging...)")
    if model_option is None:
        parser.set_defaults(model=None)
    else:
        parser.add_argument(model_option, dest="model", help="records of this model (provider/model)")
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


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be over 0 and at most 1, got {text}")
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
    except CommandError as exc:
        print(f"multillm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

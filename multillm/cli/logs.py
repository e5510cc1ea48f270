"""`multillm logs list|show|stats|compare|report|score|replay-dead`: reading the records and their scores back,
for people (rich tables) and scripts (`--json`), scoring a record, and writing the dead-lettered
records and scores to the sink.

The reading commands open the sink read-only: they never create or change one, so a
mistyped or missing sink is an error rather than a new, empty one.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from multillm import contract
from multillm.cli.comparison import Comparison, compare, comparison_rows, report_comparisons
from multillm.cli.replay_dead import replay_dead_records, summary
from multillm.cli.report import render_report
from multillm.cli.summaries import (
    ModelStats,
    RequestSummary,
    by_log_id,
    format_usd,
    model_label,
    model_stats,
    printable,
    shown,
    side_by_side_rows,
    stats_cells,
    stats_columns,
    summarize,
)
from multillm.config import ENV_SINK_URL, Settings
from multillm.errors import BrokerUnavailable, CommandError, ConfigError, RpcError
from multillm.producers.publishing import RequestPublisher
from multillm.schemas import LLMLogRecord, LLMScore, V1Score, checked_score
from multillm.sinks import RecordFilter, Sink, describe_sink, mask_url, open_sink


def record_filter(args: argparse.Namespace) -> RecordFilter:
    """The filter the command line's `--mode/--model/--trace/--session/--attr/--since/--until` ask for."""
    return RecordFilter(
        mode=args.mode,
        model_name=args.model,
        trace_id=args.trace,
        session_id=args.session,
        attributes=dict(args.attr or []),
        since=args.since,
        until=args.until,
    )


def open_for_reading(url: str) -> Sink:
    """The sink at `url`, read-only, said on stderr.

    Raises:
        ConfigError: it cannot be opened; the message says where to point instead.
    """
    try:
        sink = open_sink(url, read_only=True)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; point at the workers' sink with --sink URL, {ENV_SINK_URL} or sink_url in the config file"
        ) from None
    print(f"multillm: reading {describe_sink(url)}", file=sys.stderr)
    return sink


def run_logs(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "score":
        return _score(settings, args)
    url = args.sink or settings.sink_url
    if args.action == "replay-dead":
        return _replay(settings, url)
    sink = open_for_reading(url)
    try:
        if args.action == "show":
            one_request = RecordFilter(request_id=args.request_id)
            records, scores = sink.records(where=one_request), sink.scores(one_request)
            if not records:
                raise CommandError(f"no records for request {args.request_id!r} in the sink")
            print_output(_json(shown(records, scores)) if args.json else side_by_side_table(records, scores))
            return 0
        where = record_filter(args)
        records = sink.records(where=where)
        scores = sink.scores(where) if args.action in ("stats", "report", "compare") else []
    finally:
        sink.close()
    if args.action == "compare":
        comparison = compare(records, scores, args.baseline, args.candidate, args.judge)
        if args.json:
            print_output(msgspec.json.format(msgspec.json.encode(comparison).decode(), indent=2))
        else:
            print_output(comparison_table(comparison))
            print(comparison.conclusion)
    elif args.action == "list":
        summaries = summarize(records)[: args.limit]
        print_output(_json(summaries) if args.json else _list_table(summaries))
    elif args.action == "stats":
        stats = model_stats(records, scores)
        print_output(_json(stats) if args.json else _stats_table(stats))
    else:
        comparisons = report_comparisons(records, scores, args.baseline, args.candidate, args.judge)
        page = render_report(records, scores, recent=args.recent, comparisons=comparisons)
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"wrote {args.html}: {len(records)} records, {len(summarize(records))} requests, {len(scores)} scores")
    return 0


def _score(settings: Settings, args: argparse.Namespace) -> int:
    try:
        score = checked_score(
            V1Score(
                log_id=args.log_id,
                name=args.name,
                value=args.value,
                label=args.label,
                comment=args.comment,
                source=args.source,
                request_id=args.request_id,
            )
        )
    except ValueError as exc:  # msgspec.ValidationError among them
        raise CommandError(f"cannot score record {args.log_id!r}: {exc}") from None
    publisher = RequestPublisher(settings.broker_url, pool_size=1)
    try:
        score_id = publisher.publish_score(score, timeout=_SCORE_TIMEOUT_SECONDS)
    except (BrokerUnavailable, RpcError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        publisher.close()
    print(
        f"score {score_id} of record {score.log_id} published to {contract.SCORE_QUEUE}; the primary workers store it"
    )
    return 0


def _replay(settings: Settings, url: str) -> int:
    sink = open_sink(url)
    print(
        f"multillm: writing the records in {contract.DEAD_QUEUE} at {mask_url(settings.broker_url)}"
        f" to {describe_sink(url)}",
        file=sys.stderr,
    )
    try:
        counts = replay_dead_records(settings.broker_url, sink)
    finally:
        sink.close()
    print(summary(counts))
    return 1 if counts.failures else 0


def _json(items: Sequence[msgspec.Struct]) -> str:
    return msgspec.json.format(msgspec.json.encode(items).decode(), indent=2)


PIPED_WIDTH = 160
# How long `logs score` waits for the broker to confirm, reconnects included.
_SCORE_TIMEOUT_SECONDS = 30.0


def print_output(output: str | Table) -> None:
    """JSON or text as it is; a table as wide as the terminal, or `PIPED_WIDTH` when piped."""
    if isinstance(output, str):
        print(output)  # JSON stays one plain document: no wrapping, no colour
    else:
        console = Console()
        if not console.is_terminal:
            # Piped into a file or a pager: rich would assume 80 columns and fold model names.
            console = Console(width=PIPED_WIDTH)
        console.print(output)


def side_by_side_table(records: Sequence[LLMLogRecord], scores: Sequence[LLMScore] = ()) -> Table:
    """One column per model: what it answered, how fast, at what cost, how it was scored."""
    records = sorted(records, key=lambda r: r.model_index)
    head = records[0]
    table = Table(
        title=Text(printable(f"request {head.request_id}  trace {head.trace_id or '-'}  mode {head.mode}")),
        show_lines=True,
    )
    table.add_column("")
    for r in records:
        table.add_column(Text(printable(model_label(r))), overflow="fold")
    for label, cells in side_by_side_rows(records, by_log_id(scores)):
        # Text, not str: a str cell is read as rich markup, and model output is untrusted.
        table.add_row(label, *(Text(printable(cell)) for cell in cells))
    return table


def side_by_side(records: Sequence[LLMLogRecord]) -> str:
    """`side_by_side_table` rendered as plain text the width of the terminal."""
    buffer = io.StringIO()
    width = shutil.get_terminal_size((120, 40)).columns
    Console(file=buffer, width=width, color_system=None).print(side_by_side_table(records))
    return buffer.getvalue().rstrip("\n")


def _list_table(summaries: Sequence[RequestSummary]) -> Table | str:
    if not summaries:
        return "no records match"
    table = Table(caption="* = primary")
    for name in ("request id", "created at", "mode", "models"):
        table.add_column(name, overflow="fold")
    table.add_column("cost $", justify="right")
    for s in summaries:
        models = ", ".join(
            f"{m}{'*' if m == s.primary else ''}{'' if st == 'ok' else ' (error)'}"
            for m, st in zip(s.models, s.statuses, strict=True)
        )
        cells = (s.request_id, s.created_at, s.mode, models, format_usd(s.cost_usd))
        table.add_row(*(Text(printable(cell)) for cell in cells))
    return table


def comparison_table(comparison: Comparison) -> Table:
    """`logs compare`'s table: a row a figure, the two models and their ratio."""
    table = Table(
        title=f"{comparison.candidate.model_name} (candidate) against {comparison.baseline.model_name} (baseline)",
        caption="pairs: the two models' records of the same request (or of a replay of it); latencies and"
        " tokens over successful calls",
    )
    for name, justify in (("", "left"), ("baseline", "right"), ("candidate", "right"), ("ratio", "right")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in comparison_rows(comparison):
        table.add_row(*row)
    return table


def _stats_table(stats: Sequence[ModelStats]) -> Table | str:
    if not stats:
        return "no records match"
    table = Table(
        caption="latencies over successful calls; tokens and cost are totals; cost over priced records;"
        " up %: the share of feedback scores that are up"
    )
    # As wide as the longest name (up to 40 characters): the numbers give way, not the model.
    widest = min(40, max(len(s.model_name) for s in stats))
    columns = stats_columns(stats)
    table.add_column(columns[0], overflow="fold", min_width=widest)
    for name in columns[1:-1]:
        table.add_column(name, justify="right")
    # One score name a line, "quality 0.55 n=2" whole unless the name is long: rich folds this column first.
    table.add_column(columns[-1], min_width=16)
    for s in stats:
        cells = stats_cells(s, columns)
        table.add_row(Text(printable(cells[0])), *cells[1:])
    return table

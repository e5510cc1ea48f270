"""`multillm logs list|show|stats`: reading the records back, for people and for scripts."""

from __future__ import annotations

import argparse
import shutil
import statistics
import textwrap
from collections import defaultdict
from collections.abc import Sequence

import msgspec

from multillm.cli.commands import CommandError
from multillm.config import Settings
from multillm.schemas import LLMLogRecord
from multillm.sinks import open_sink


class RequestSummary(msgspec.Struct):
    request_id: str
    created_at: str
    models: list[str]
    statuses: list[str]
    primary: str


class ModelStats(msgspec.Struct):
    model_name: str
    records: int
    errors: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    mean_total_tokens: float | None
    mean_attempts: float


def run_logs(settings: Settings, args: argparse.Namespace) -> int:
    sink = open_sink(settings.sink_url)
    try:
        if args.action == "show":
            records = sink.records(args.request_id)
            if not records:
                raise CommandError(f"no records for request {args.request_id!r} in the sink")
            print(_json(records) if args.json else side_by_side(records))
        elif args.action == "list":
            summaries = summarize(sink.records())[: args.limit]
            print(_json(summaries) if args.json else _list_table(summaries))
        else:
            stats = model_stats(sink.records())
            print(_json(stats) if args.json else _stats_table(stats))
    finally:
        sink.close()
    return 0


def _json(items: Sequence[msgspec.Struct]) -> str:
    return msgspec.json.format(msgspec.json.encode(items).decode(), indent=2)


def summarize(records: Sequence[LLMLogRecord]) -> list[RequestSummary]:
    """One line per request, newest first."""
    by_request: dict[str, list[LLMLogRecord]] = defaultdict(list)
    for record in records:
        by_request[record.request_id].append(record)
    summaries = []
    for request_id, group in by_request.items():
        group.sort(key=lambda r: r.model_index)
        primary = next((r.model_name for r in group if r.is_primary), "")
        summaries.append(
            RequestSummary(
                request_id=request_id,
                created_at=min(r.created_at for r in group),
                models=[r.model_name for r in group],
                statuses=[r.status for r in group],
                primary=primary,
            )
        )
    summaries.sort(key=lambda s: s.created_at, reverse=True)
    return summaries


def model_stats(records: Sequence[LLMLogRecord]) -> list[ModelStats]:
    by_model: dict[str, list[LLMLogRecord]] = defaultdict(list)
    for record in records:
        by_model[record.model_name].append(record)
    stats = []
    for name, group in sorted(by_model.items()):
        ok = [r for r in group if r.status == "ok"]
        latencies = sorted(r.latency_ms for r in ok if r.latency_ms is not None)
        tokens = [r.total_tokens for r in ok if r.total_tokens is not None]
        stats.append(
            ModelStats(
                model_name=name,
                records=len(group),
                errors=len(group) - len(ok),
                latency_ms_p50=_percentile(latencies, 0.50),
                latency_ms_p95=_percentile(latencies, 0.95),
                mean_total_tokens=round(statistics.fmean(tokens), 1) if tokens else None,
                mean_attempts=round(statistics.fmean(r.attempts for r in group), 2),
            )
        )
    return stats


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 1)


def side_by_side(records: Sequence[LLMLogRecord]) -> str:
    """One column per model: what each was asked, what it answered, and what it cost."""
    records = sorted(records, key=lambda r: r.model_index)
    width = max(24, (shutil.get_terminal_size((120, 40)).columns - 14) // max(1, len(records)) - 3)
    rows: list[tuple[str, list[str]]] = [
        ("model", [r.model_name + (" (primary)" if r.is_primary else "") for r in records]),
        ("status", [r.status if r.status == "ok" else f"error {r.error_code}" for r in records]),
        ("external id", [r.external_id or "-" for r in records]),
        ("latency", [f"{r.latency_ms:.0f} ms" if r.latency_ms is not None else "-" for r in records]),
        ("attempts", [str(r.attempts) for r in records]),
        ("tokens", [f"{r.prompt_tokens}+{r.completion_tokens}" if r.total_tokens else "-" for r in records]),
        ("output", [_output_text(r) for r in records]),
    ]
    head = records[0]
    lines = [f"request {head.request_id}  trace {head.trace_id}  mode {head.mode}"]
    for label, cells in rows:
        wrapped = [textwrap.wrap(cell, width, break_on_hyphens=False) or [""] for cell in cells]
        for i in range(max(len(w) for w in wrapped)):
            parts = [(w[i] if i < len(w) else "").ljust(width) for w in wrapped]
            lines.append(f"  {label if i == 0 else '':<12}" + " | ".join(parts).rstrip())
    return "\n".join(lines)


def _output_text(record: LLMLogRecord) -> str:
    if record.status != "ok":
        return record.error_message or ""
    return " ".join(choice.message.content or "" for choice in record.output or [])


def _list_table(summaries: Sequence[RequestSummary]) -> str:
    if not summaries:
        return "no records yet"
    lines = [f"{'request id':<38}{'created at':<26}models"]
    for s in summaries:
        models = ", ".join(
            f"{m}{'*' if m == s.primary else ''}{'' if st == 'ok' else ' (error)'}"
            for m, st in zip(s.models, s.statuses, strict=True)
        )
        lines.append(f"{s.request_id:<38}{s.created_at:<26}{models}")
    return "\n".join(lines) + "\n(* = primary)"


def _stats_table(stats: Sequence[ModelStats]) -> str:
    if not stats:
        return "no records yet"
    lines = [f"{'model':<32}{'records':>8}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'tokens':>8}{'tries':>7}"]
    for s in stats:
        lines.append(
            f"{s.model_name:<32}{s.records:>8}{s.errors:>8}{_num(s.latency_ms_p50):>9}"
            f"{_num(s.latency_ms_p95):>9}{_num(s.mean_total_tokens):>8}{s.mean_attempts:>7}"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"

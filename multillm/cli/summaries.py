"""What `multillm logs` computes from records and their scores: per-request summaries and per-model figures.

Pure functions over `LLMLogRecord`s and `LLMScore`s, shared by the terminal tables, `--json` and the
HTML report.
The Structs here are the `--json` output: their field names are part of the command's interface.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Final

import msgspec

from multillm.quantiles import nearest_rank
from multillm.schemas import FEEDBACK, FEEDBACK_VALUES, LLMLogRecord, LLMScore, Mode

# C0/C1 controls other than newline and tab: model output could otherwise drive the terminal (ESC sequences).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# The columns of the per-model table, in the terminal and in the HTML report.
FIRST_TOKEN_COLUMN = "first token p50 ms"
STATS_COLUMNS = (
    "model",
    "records",
    "errors",
    "error %",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    FIRST_TOKEN_COLUMN,
    "tokens in",
    "tokens out",
    "tries",
    "cost $",
    "$ / 1k req",
    "up %",
    "score means",
)


class RequestSummary(msgspec.Struct):
    """One request in `logs list --json`: its records' models and statuses in model order."""

    request_id: str
    created_at: str
    mode: Mode
    models: list[str]
    statuses: list[str]
    primary: str
    # The sum over its priced records; None when none is priced.
    cost_usd: float | None = None


class ScoreMean(msgspec.Struct):
    """The numeric scores of one name given to one model's records."""

    count: int
    mean: float


class ModelStats(msgspec.Struct):
    """One model in `logs stats --json`. Latencies are over `ok` records; token counts are totals."""

    model_name: str
    records: int
    errors: int
    error_rate: float
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    # Of its streamed calls (the primary's of requests that asked for a stream); None when none was.
    time_to_first_token_ms_p50: float | None
    prompt_tokens: int
    completion_tokens: int
    mean_total_tokens: float | None
    mean_attempts: float
    # Over the records with a known price (`priced`); None when none has one. A record is one
    # request to this model, so the mean per record is the mean per request.
    priced: int = 0
    cost_usd: float | None = None
    mean_cost_usd: float | None = None
    cost_per_1k_requests_usd: float | None = None
    # Scores of its records: how many `feedback` scores, the share of them `up` (None: none),
    # and per score name the mean of the numeric values (`feedback` among them, as 1 and 0).
    feedback: int = 0
    feedback_up_share: float | None = None
    scores: dict[str, ScoreMean] = msgspec.field(default_factory=dict)


class ShownRecord(LLMLogRecord, kw_only=True):
    """A record in `logs show --json`: every field of the record, and its scores."""

    scores: list[LLMScore] = msgspec.field(default_factory=list)


def by_log_id(scores: Sequence[LLMScore]) -> dict[str, list[LLMScore]]:
    """The scores grouped by the record they score, each group in `created_at` order."""
    groups: dict[str, list[LLMScore]] = defaultdict(list)
    for score in sorted(scores, key=lambda s: (s.created_at, s.score_id)):
        groups[score.log_id].append(score)
    return groups


def shown(records: Sequence[LLMLogRecord], scores: Sequence[LLMScore]) -> list[ShownRecord]:
    """`records` with their scores, for `logs show --json`."""
    scored = by_log_id(scores)
    fields = msgspec.structs.fields(LLMLogRecord)
    return [
        ShownRecord(**{f.name: getattr(r, f.name) for f in fields}, scores=scored.get(r.log_id, [])) for r in records
    ]


def score_figures(scores: Sequence[LLMScore]) -> tuple[int, float | None, dict[str, ScoreMean]]:
    """(feedback scores, the share of them up, the mean of each name's numeric values)."""
    feedback = [s for s in scores if s.name == FEEDBACK and s.label in FEEDBACK_VALUES]
    up = sum(1 for s in feedback if s.label == "up")
    values: dict[str, list[float]] = defaultdict(list)
    for score in scores:
        if score.value is not None:
            values[score.name].append(score.value)
    means = {name: ScoreMean(len(v), round(math.fsum(v) / len(v), 4)) for name, v in sorted(values.items())}
    return len(feedback), round(up / len(feedback), 4) if feedback else None, means


def by_request(records: Sequence[LLMLogRecord]) -> list[list[LLMLogRecord]]:
    """The records grouped by request, newest request first, each group in model order."""
    groups: dict[str, list[LLMLogRecord]] = defaultdict(list)
    for record in records:
        groups[record.request_id].append(record)
    for group in groups.values():
        group.sort(key=lambda r: r.model_index)
    return sorted(groups.values(), key=lambda g: min(r.created_at for r in g), reverse=True)


def summarize(records: Sequence[LLMLogRecord]) -> list[RequestSummary]:
    """One summary per request, newest first."""
    return [
        RequestSummary(
            request_id=group[0].request_id,
            created_at=request_created_at(group),
            mode=group[0].mode,
            models=[r.model_name for r in group],
            statuses=[r.status for r in group],
            primary=next((r.model_name for r in group if r.is_primary), ""),
            cost_usd=total_cost(group),
        )
        for group in by_request(records)
    ]


def total_cost(records: Sequence[LLMLogRecord]) -> float | None:
    """What the priced records cost together, in USD; None when none is priced."""
    costs = [r.cost_usd for r in records if r.cost_usd is not None]
    return round(math.fsum(costs), 9) if costs else None


def format_usd(value: float | None) -> str:
    """A cost as the tables print it: enough digits for a cheap call, `-` when unknown."""
    return "-" if value is None else f"{value:.6f}" if value < 1 else f"{value:,.2f}"


def request_created_at(group: Sequence[LLMLogRecord]) -> str:
    """When a request was made: its earliest record's `created_at` (each model's call starts on its own)."""
    return min(r.created_at for r in group)


def format_ms(value: float | None) -> str:
    """A latency as every table and the report print it: whole milliseconds, `-` for none."""
    return "-" if value is None else f"{value:.0f}"


def ok_latencies(records: Sequence[LLMLogRecord]) -> list[float]:
    """Sorted latencies of the successful calls: an error's latency is mostly retry backoff."""
    return sorted(r.latency_ms for r in records if r.status == "ok" and r.latency_ms is not None)


def by_model(records: Sequence[LLMLogRecord]) -> dict[str, list[LLMLogRecord]]:
    """The records grouped by model, models in name order."""
    groups: dict[str, list[LLMLogRecord]] = defaultdict(list)
    for record in records:
        groups[record.model_name].append(record)
    return dict(sorted(groups.items()))


def model_stats(records: Sequence[LLMLogRecord], scores: Sequence[LLMScore] = ()) -> list[ModelStats]:
    """Per-model figures, models in name order; `scores` of records not among `records` are left out."""
    scored = by_log_id(scores)
    stats = []
    for name, group in by_model(records).items():
        feedback, up_share, means = score_figures([s for r in group for s in scored.get(r.log_id, [])])
        errors = sum(1 for r in group if r.status != "ok")
        latencies = ok_latencies(group)
        first_tokens = sorted(r.time_to_first_token_ms for r in group if r.time_to_first_token_ms is not None)
        totals = [r.total_tokens for r in group if r.total_tokens is not None]
        priced = sum(1 for r in group if r.cost_usd is not None)
        cost = total_cost(group)
        mean_cost = None if cost is None else cost / priced
        stats.append(
            ModelStats(
                model_name=name,
                records=len(group),
                errors=errors,
                error_rate=round(errors / len(group), 4),
                latency_ms_p50=percentile(latencies, 0.50),
                latency_ms_p95=percentile(latencies, 0.95),
                latency_ms_p99=percentile(latencies, 0.99),
                time_to_first_token_ms_p50=percentile(first_tokens, 0.50),
                prompt_tokens=sum(r.prompt_tokens or 0 for r in group),
                completion_tokens=sum(r.completion_tokens or 0 for r in group),
                mean_total_tokens=round(statistics.fmean(totals), 1) if totals else None,
                mean_attempts=round(statistics.fmean(r.attempts for r in group), 2),
                priced=priced,
                cost_usd=cost,
                mean_cost_usd=None if mean_cost is None else round(mean_cost, 9),
                cost_per_1k_requests_usd=None if mean_cost is None else round(mean_cost * 1000, 6),
                feedback=feedback,
                feedback_up_share=up_share,
                scores=means,
            )
        )
    return stats


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """`nearest_rank` to a tenth of a millisecond (`--json`; tables print `format_ms`); None for no values."""
    return round(nearest_rank(sorted_values, q), 1) if sorted_values else None


def output_text(record: LLMLogRecord) -> str:
    """What the model answered (its choices' text), or why it failed."""
    if record.status != "ok":
        return f"error {record.error_code}: {record.error_message or ''}"
    return "\n".join(choice.message.content or "" for choice in record.output or [])


def side_by_side_rows(
    records: Sequence[LLMLogRecord], scored: Mapping[str, list[LLMScore]] | None = None
) -> list[tuple[str, list[str]]]:
    """(label, one cell per record) rows comparing the models of one request, the answer last;
    `scored`: the scores by log id (`by_log_id`)."""
    scored = scored or {}
    return [
        ("status", [r.status if r.status == "ok" else f"error {r.error_code}" for r in records]),
        ("latency", [latency_text(r) for r in records]),
        ("tokens in/out", [f"{r.prompt_tokens} / {r.completion_tokens}" if r.total_tokens else "-" for r in records]),
        ("attempts", [str(r.attempts) for r in records]),
        ("cost $", [format_usd(r.cost_usd) for r in records]),
        ("scores", ["\n".join(map(score_text, scored.get(r.log_id, []))) or "-" for r in records]),
        ("external id", [r.external_id or "-" for r in records]),
        ("answer", [output_text(r) for r in records]),
    ]


def latency_text(record: LLMLogRecord) -> str:
    """`457 ms`, and the time to the first token of a streamed call: `457 ms (first token 190 ms)`."""
    if record.latency_ms is None:
        return "-"
    first = record.time_to_first_token_ms
    return f"{format_ms(record.latency_ms)} ms" + ("" if first is None else f" (first token {format_ms(first)} ms)")


def score_text(score: LLMScore) -> str:
    """One score on one line: `feedback up`, `quality 0.8 (by reviewer)`."""
    shown_value = score.label if score.label is not None else f"{score.value:g}"
    return f"{score.name} {shown_value}" + (f" (by {score.source})" if score.source else "")


def model_label(record: LLMLogRecord) -> str:
    return record.model_name + (" (primary)" if record.is_primary else "")


def printable(text: str) -> str:
    """`text` with control characters shown as `\\xNN` instead of sent to the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def stats_columns(stats: Sequence[ModelStats]) -> list[str]:
    """The columns of a stats table: `STATS_COLUMNS`, without the time to first token when no call
    of these models was streamed (the table is wide enough without a column of dashes)."""
    if any(s.time_to_first_token_ms_p50 is not None for s in stats):
        return list(STATS_COLUMNS)
    return [c for c in STATS_COLUMNS if c != FIRST_TOKEN_COLUMN]


def stats_cells(s: ModelStats, columns: Sequence[str] = STATS_COLUMNS) -> list[str]:
    """One model's figures as the cells of a row of `columns` (`stats_columns`)."""
    latencies = (s.latency_ms_p50, s.latency_ms_p95, s.latency_ms_p99)
    first_token = [format_ms(s.time_to_first_token_ms_p50)] if FIRST_TOKEN_COLUMN in columns else []
    return [
        s.model_name,
        str(s.records),
        str(s.errors),
        f"{s.error_rate * 100:.1f}",
        *(format_ms(v) for v in latencies),
        *first_token,
        str(s.prompt_tokens),
        str(s.completion_tokens),
        f"{s.mean_attempts:g}",
        format_usd(s.cost_usd),
        format_usd(s.cost_per_1k_requests_usd),
        "-" if s.feedback_up_share is None else f"{s.feedback_up_share * 100:.0f}% of {s.feedback}",
        "\n".join(f"{name} {m.mean:g} n={m.count}" for name, m in s.scores.items()) or "-",
    ]

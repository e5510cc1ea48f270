"""`multillm logs compare`: two models' records of the same requests, paired, and what the pairs show.

A pair is the baseline's and the candidate's record of one original request: both in the
request itself, or one of them (or both) in a replay of it (`replayOf`). Where a model has
more than one record for a request, the one in the request itself is taken, else the
earliest replay. The judge's verdicts (`judge.vs_primary`) compare an answer with the
primary's, so they speak to a pair only when one of the two is the original primary: the
candidate's own verdict when the baseline is the primary, the baseline's turned around
when the candidate is.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Final

import msgspec

from multillm import contract
from multillm.cli.summaries import format_ms, format_usd, ok_latencies, percentile, total_cost
from multillm.errors import CommandError
from multillm.records import is_judge_record, origin_of
from multillm.schemas import LLMLogRecord, LLMScore

# The normal quantile of a two-sided 95% interval.
_Z95: Final = 1.959963984540054
# Fewer pairs than this, and the last line says to collect more before deciding.
ENOUGH_PAIRS: Final = 30
# Median latencies within this share of each other are "about as fast": run-to-run noise.
_SAME_SPEED: Final = 0.1
_TURNED: Final = {"win": "loss", "loss": "win", "tie": "tie"}


class Side(msgspec.Struct, kw_only=True):
    """One model's figures over the pairs (latency and tokens of its `ok` records only)."""

    model_name: str
    errors: int
    error_rate: float
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    mean_prompt_tokens: float | None
    mean_completion_tokens: float | None
    priced: int
    cost_usd: float | None
    cost_per_1k_requests_usd: float | None


class Verdicts(msgspec.Struct, kw_only=True):
    """The judge's verdicts on the pairs, from the candidate's side; `win_or_tie_*`: the share of
    win or tie among the judged pairs and its 95% Wilson interval."""

    judge: str | None
    judged: int
    win: int
    tie: int
    loss: int
    win_or_tie_rate: float | None
    win_or_tie_ci95_low: float | None
    win_or_tie_ci95_high: float | None


class Comparison(msgspec.Struct, kw_only=True):
    """What `logs compare --json` prints (field names are stable; docs/operations.md)."""

    pairs: int
    baseline: Side
    candidate: Side
    latency_p50_ratio: float | None
    latency_p95_ratio: float | None
    cost_ratio: float | None
    verdicts: Verdicts
    conclusion: str


Pair = tuple[LLMLogRecord, LLMLogRecord]


def pairs(records: Sequence[LLMLogRecord], baseline: str, candidate: str) -> list[Pair]:
    """(baseline, candidate) records of the same original request, oldest request first."""
    chosen: dict[tuple[str, str], LLMLogRecord] = {}
    for record in sorted(records, key=lambda r: (r.created_at, r.log_id)):
        if record.model_name not in (baseline, candidate) or is_judge_record(record):
            continue
        key = (origin_of(record), record.model_name)
        current = chosen.get(key)
        # The request's own record first, else the earliest replay.
        if current is None or (record.request_id == key[0] and current.request_id != key[0]):
            chosen[key] = record
    return [
        (record, chosen[(origin, candidate)])
        for (origin, model), record in chosen.items()
        if model == baseline and (origin, candidate) in chosen
    ]


def wilson(successes: int, trials: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: sound at small counts and at 0% or 100%."""
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def judges(scores: Sequence[LLMScore]) -> list[str]:
    """The judges (sources) of the `judge.vs_primary` scores, sorted."""
    return sorted({s.source or "" for s in scores if s.name == contract.JUDGE_SCORE_NAME})


def compare(
    records: Sequence[LLMLogRecord],
    scores: Sequence[LLMScore],
    baseline: str,
    candidate: str,
    judge: str | None = None,
) -> Comparison:
    """The comparison of `candidate` against `baseline` over their pairs in `records`.

    Raises:
        CommandError: the two are the same model, or several judges scored and `judge` names none of them.
    """
    if baseline == candidate:
        raise CommandError(f"--baseline and --candidate are both {baseline!r}: name two models")
    found = pairs(records, baseline, candidate)
    base = _side(baseline, [b for b, _ in found])
    cand = _side(candidate, [c for _, c in found])
    verdicts = _verdicts(found, scores, judge)
    return Comparison(
        pairs=len(found),
        baseline=base,
        candidate=cand,
        latency_p50_ratio=_ratio(cand.latency_ms_p50, base.latency_ms_p50),
        latency_p95_ratio=_ratio(cand.latency_ms_p95, base.latency_ms_p95),
        cost_ratio=_ratio(cand.cost_per_1k_requests_usd, base.cost_per_1k_requests_usd),
        verdicts=verdicts,
        conclusion=_conclusion(len(found), base, cand, verdicts),
    )


def _side(model: str, records: list[LLMLogRecord]) -> Side:
    errors = sum(1 for r in records if r.status != "ok")
    latencies = ok_latencies(records)
    ok = [r for r in records if r.status == "ok"]
    priced = sum(1 for r in records if r.cost_usd is not None)
    cost = total_cost(records)
    # Per 1,000 requests, over every pair: a failed call that cost nothing still counts as a request.
    per_1k = None if cost is None or priced < len(records) else round(cost / len(records) * 1000, 6)
    return Side(
        model_name=model,
        errors=errors,
        error_rate=round(errors / len(records), 4) if records else 0.0,
        latency_ms_p50=percentile(latencies, 0.50),
        latency_ms_p95=percentile(latencies, 0.95),
        mean_prompt_tokens=_mean([r.prompt_tokens for r in ok]),
        mean_completion_tokens=_mean([r.completion_tokens for r in ok]),
        priced=priced,
        cost_usd=cost,
        cost_per_1k_requests_usd=per_1k,
    )


def _mean(values: list[int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.fmean(known), 1) if known else None


def _ratio(candidate: float | None, baseline: float | None) -> float | None:
    if candidate is None or baseline is None or baseline == 0:
        return None
    return round(candidate / baseline, 3)


def _verdicts(found: list[Pair], scores: Sequence[LLMScore], judge: str | None) -> Verdicts:
    verdict_scores = [s for s in scores if s.name == contract.JUDGE_SCORE_NAME]
    sources = judges(verdict_scores)
    source: str | None
    if judge is not None:
        source = contract.JUDGE_SOURCE_PREFIX + judge
        if source not in sources:
            raise CommandError(f"no verdicts of judge {judge!r}: judges in these records: {_names(sources)}")
    elif len(sources) > 1:
        raise CommandError(f"several judges scored these records ({_names(sources)}): pick one with --judge MODEL")
    else:
        source = sources[0] if sources else None
    labels = {s.log_id: s.label for s in verdict_scores if s.source == source}
    counts = {"win": 0, "tie": 0, "loss": 0}
    for base, cand in found:
        label = None
        if base.is_primary and base.request_id == origin_of(cand):
            label = labels.get(cand.log_id)
        elif cand.is_primary and cand.request_id == origin_of(base):
            label = _TURNED.get(labels.get(base.log_id) or "")
        if label in counts:
            counts[label] += 1
    judged = sum(counts.values())
    rate = low = high = None
    if judged:
        rate = round((counts["win"] + counts["tie"]) / judged, 4)
        low, high = (round(bound, 4) for bound in wilson(counts["win"] + counts["tie"], judged))
    return Verdicts(
        judge=source.removeprefix(contract.JUDGE_SOURCE_PREFIX) if source else None,
        judged=judged,
        win_or_tie_rate=rate,
        win_or_tie_ci95_low=low,
        win_or_tie_ci95_high=high,
        **counts,
    )


def _names(sources: list[str]) -> str:
    return ", ".join(s.removeprefix(contract.JUDGE_SOURCE_PREFIX) for s in sources) or "none"


def _conclusion(count: int, base: Side, cand: Side, verdicts: Verdicts) -> str:
    """What the figures support, and what they do not, in words."""
    if count == 0:
        return (
            f"No pairs: no request has records of both {base.model_name} and {cand.model_name}"
            " (send both in requests, or replay logged traffic to the candidate with `multillm replay`)."
        )
    supported: list[str] = []
    unsupported: list[str] = []
    low, high = verdicts.win_or_tie_ci95_low, verdicts.win_or_tie_ci95_high
    if low is None or high is None:
        unsupported.append("any claim about quality (no judge verdicts on these pairs)")
    elif low >= 0.5:
        supported.append(f"the candidate is at least as good in most requests (95% CI {low:.0%}-{high:.0%})")
    elif high < 0.5:
        supported.append(f"the candidate is worse in most requests (win or tie 95% CI {low:.0%}-{high:.0%})")
    else:
        unsupported.append(f"that the candidate is at least as good (win or tie 95% CI {low:.0%}-{high:.0%} spans 50%)")
    cost = _ratio(cand.cost_per_1k_requests_usd, base.cost_per_1k_requests_usd)
    if cost is None:
        unsupported.append("a cost comparison (a model's price is unknown)")
    else:
        supported.append(f"the candidate costs {cost:.2f}x as much")
    p50 = _ratio(cand.latency_ms_p50, base.latency_ms_p50)
    if p50 is not None:
        pace = "about as fast" if abs(p50 - 1) < _SAME_SPEED else "slower" if p50 > 1 else "faster"
        supported.append(f"it is {pace} at the median ({p50:.2f}x)")
    if cand.errors != base.errors:
        more = "more" if cand.errors > base.errors else "less"
        supported.append(f"it failed {more} often ({cand.error_rate:.1%} against {base.error_rate:.1%})")
    if count < ENOUGH_PAIRS:
        unsupported.append(f"a decision on {count} pairs (collect at least {ENOUGH_PAIRS})")
    said = f"On {count} pairs: the figures support: {'; '.join(supported) or 'nothing yet'}."
    return said + (f" They do not support: {'; '.join(unsupported)}." if unsupported else "")


def comparison_rows(c: Comparison) -> list[tuple[str, str, str, str]]:
    """(figure, baseline, candidate, candidate/baseline) rows, as the table and the report show them."""
    b, k, v = c.baseline, c.candidate, c.verdicts
    judged = share = "-"
    if v.judged:
        judged = f"{v.win} / {v.tie} / {v.loss}"
        share = f"{v.win_or_tie_rate:.0%} ({v.win_or_tie_ci95_low:.0%}-{v.win_or_tie_ci95_high:.0%})"
    return [
        ("pairs", str(c.pairs), str(c.pairs), ""),
        ("errors", f"{b.errors} ({b.error_rate:.1%})", f"{k.errors} ({k.error_rate:.1%})", ""),
        ("latency p50 ms", format_ms(b.latency_ms_p50), format_ms(k.latency_ms_p50), _x(c.latency_p50_ratio)),
        ("latency p95 ms", format_ms(b.latency_ms_p95), format_ms(k.latency_ms_p95), _x(c.latency_p95_ratio)),
        ("mean tokens in / out", _tokens(b), _tokens(k), ""),
        (
            "cost $ per 1k requests",
            format_usd(b.cost_per_1k_requests_usd),
            format_usd(k.cost_per_1k_requests_usd),
            _x(c.cost_ratio),
        ),
        ("judge: win / tie / loss", "", judged, ""),
        ("judge: win or tie (95% CI)", "", share, ""),
    ]


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _tokens(side: Side) -> str:
    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    return f"{shown(side.mean_prompt_tokens)} / {shown(side.mean_completion_tokens)}"


def report_comparisons(
    records: Sequence[LLMLogRecord],
    scores: Sequence[LLMScore],
    baseline: str | None = None,
    candidate: str | None = None,
    judge: str | None = None,
) -> list[Comparison]:
    """What `logs report` compares: `candidate` against `baseline` when given; else each model against
    the model most often primary (the one in use), where they share a request."""
    if baseline and candidate:
        return [compare(records, scores, baseline, candidate, judge)]
    traffic = [r for r in records if not is_judge_record(r)]
    primaries = Counter(r.model_name for r in traffic if r.is_primary)
    if not primaries:
        return []
    usual = baseline or primaries.most_common(1)[0][0]
    others = sorted({r.model_name for r in traffic} - {usual})
    found = [compare(traffic, scores, usual, other, judge) for other in others]
    return [c for c in found if c.pairs]

"""`multillm logs report --html FILE`: one self-contained HTML page comparing the models.

No scripts, stylesheets, fonts or images from anywhere: the page is opened from a
file, maybe offline, maybe mailed around. The charts are inline SVG drawn here (HTML5 needs no
xmlns on inline SVG, so the page holds no URL at all).
Every string taken from a record goes through `html.escape`: model output is untrusted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Final

from multillm.cli.comparison import Comparison, Verdicts, comparison_rows, pairs
from multillm.cli.summaries import (
    ModelStats,
    by_log_id,
    by_model,
    by_request,
    format_ms,
    format_usd,
    model_label,
    model_stats,
    ok_latencies,
    percentile,
    request_created_at,
    side_by_side_rows,
    stats_cells,
    stats_columns,
)
from multillm.schemas import LLMLogRecord, LLMScore

BINS: Final = 24
WIDTH, HEIGHT, MARGIN = 480, 168, 28
# Above the plot: the chart's caption, then one row per percentile label, so no two overlap.
CAPTION_Y, LABEL_ROWS_Y, PLOT_TOP = 12, (26, 37, 48), 56
# The widest a character of the 10px sans-serif labels is drawn (DejaVu Sans digits: 6.4px):
# labels are placed so that this many pixels a character stay inside the chart.
CHAR_PX: Final = 6.5

_STYLE: Final = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.answers td { white-space: pre-wrap; max-width: 40em; }
.error { color: #b00; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-weight: 600; }
svg text { font: 10px sans-serif; fill: #444; }
"""


def render_report(
    records: Sequence[LLMLogRecord],
    scores: Sequence[LLMScore] = (),
    *,
    recent: int = 20,
    comparisons: Sequence[Comparison] = (),
) -> str:
    """The whole page: per-model figures, a latency histogram per model, cost per 1,000 requests,
    the scores per model, each of `comparisons` (`logs compare`) with its charts, the latest
    `recent` requests."""
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    stats = model_stats(records, scores)
    scored = by_log_id(scores)  # once: each request shown looks its records' scores up
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>multillm report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>multillm: models compared</h1>",
        f"<p>{len(records)} records, generated {escape(generated)}</p>",
        "<h2>Per model</h2>",
        _stats_table(stats),
        "<h2>Latency of successful calls</h2>",
        _charts(records),
        "<h2>Cost per 1,000 requests</h2>",
        cost_chart([(s.model_name, s.cost_per_1k_requests_usd) for s in stats]),
        "<h2>Scores</h2>",
        _scores_table(stats),
        "<h2>Comparisons</h2>",
        *(_comparison(records, c) for c in comparisons),
        "" if comparisons else "<p>no two models share a request</p>",
        f"<h2>Latest {recent} requests</h2>",
        *(_answers(group, scored) for group in by_request(records)[:recent]),
        "</body></html>",
    ]
    return "\n".join(parts)


def _stats_table(stats: Sequence[ModelStats]) -> str:
    columns = stats_columns(stats)
    head = "".join(f"<th>{escape(name)}</th>" for name in columns)
    rows = []
    for one in stats:
        name, *figures = stats_cells(one, columns)
        cells = f"<td>{escape(name)}</td>" + "".join(f'<td class="n">{escape(v)}</td>' for v in figures)
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def cost_chart(costs: Sequence[tuple[str, float | None]]) -> str:
    """An SVG bar per priced model of (model, USD per 1,000 requests or None): what 1,000 requests to it
    cost, on one scale."""
    priced = [(name, cost) for name, cost in costs if cost is not None]
    if not priced:
        return "<p>no priced records (docs/operations.md, Prices)</p>"
    top = max(cost for _, cost in priced) or 1.0
    name_w, bar_h, gap = 220, 16, 6
    plot_w = WIDTH - name_w - 90
    height = len(priced) * (bar_h + gap) + gap
    shapes = []
    for row, (name, cost) in enumerate(priced):
        y = gap + row * (bar_h + gap)
        w = cost / top * plot_w
        shapes.append(
            f'<text x="{name_w - 6}" y="{y + 12}" text-anchor="end">{escape(_cut(name, name_w))}</text>'
            f'<rect x="{name_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4a7fb5">'
            f"<title>{escape(name)}: ${escape(format_usd(cost))} per 1,000 requests</title></rect>"
            f'<text x="{name_w + w + 4:.1f}" y="{y + 12}">${escape(format_usd(cost))}</text>'
        )
    return f'<svg width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">{"".join(shapes)}</svg>'


def _comparison(records: Sequence[LLMLogRecord], c: Comparison) -> str:
    """One `logs compare`: its table, the paired calls' latencies, their cost, the judge's verdicts, the words."""
    base, cand = c.baseline.model_name, c.candidate.model_name
    found = pairs(records, base, cand)
    latencies = {base: ok_latencies([b for b, _ in found]), cand: ok_latencies([k for _, k in found])}
    top = max((v for values in latencies.values() for v in values), default=0.0) or 1.0
    rows = "".join(
        f"<tr><td>{escape(name)}</td>" + "".join(f'<td class="n">{escape(v)}</td>' for v in cells) + "</tr>"
        for name, *cells in comparison_rows(c)
    )
    histograms = "".join(
        f"<figure><figcaption>{escape(name)}</figcaption>{histogram(values, top)}</figure>"
        for name, values in latencies.items()
        if values
    )
    costs = [(base, c.baseline.cost_per_1k_requests_usd), (cand, c.candidate.cost_per_1k_requests_usd)]
    return (
        f"<h3>{escape(cand)} (candidate) against {escape(base)} (baseline)</h3>"
        f"<table><tr><th></th><th>baseline</th><th>candidate</th><th>ratio</th></tr>{rows}</table>"
        f'<div class="charts">{histograms}'
        f"<figure><figcaption>cost per 1,000 requests</figcaption>{cost_chart(costs)}</figure>"
        f"<figure><figcaption>judge: the candidate's win / tie / loss</figcaption>{verdict_chart(c.verdicts)}</figure>"
        f"</div><p><b>{escape(c.conclusion)}</b></p>"
    )


def verdict_chart(v: Verdicts) -> str:
    """An SVG bar of the candidate's wins, ties and losses, with the 95% interval of win-or-tie and 50% marked."""
    if not v.judged:
        return "<p>no judge verdicts (multillm worker judge)</p>"
    plot_w, bar_y, bar_h, height = WIDTH - 2 * MARGIN, 24, 20, 74
    shapes, x = [], float(MARGIN)
    for count, colour, name in ((v.win, "#2a2", "win"), (v.tie, "#aaa", "tie"), (v.loss, "#c22", "loss")):
        w = count / v.judged * plot_w
        shapes.append(
            f'<rect x="{x:.1f}" y="{bar_y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
            f"<title>{count} {name}</title></rect>"
        )
        x += w
    low = MARGIN + (v.win_or_tie_ci95_low or 0.0) * plot_w
    high = MARGIN + (v.win_or_tie_ci95_high or 0.0) * plot_w
    whisker_y = bar_y + bar_h + 10
    half = MARGIN + plot_w / 2
    shapes.append(
        f'<line x1="{low:.1f}" x2="{high:.1f}" y1="{whisker_y}" y2="{whisker_y}" stroke="#222" stroke-width="2">'
        "<title>95% interval of the win-or-tie share</title></line>"
        f'<line x1="{half:.1f}" x2="{half:.1f}" y1="{bar_y - 4}" y2="{whisker_y + 4}" stroke="#222"'
        ' stroke-dasharray="3"/>'
        f'<text x="{MARGIN}" y="12">{v.win} win, {v.tie} tie, {v.loss} loss of {v.judged}</text>'
        f'<text x="{half:.1f}" y="{height - 4}" text-anchor="middle">50%</text>'
    )
    return f'<svg width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">{"".join(shapes)}</svg>'


def _cut(name: str, width_px: int) -> str:
    """`name` shortened to fit `width_px` of label, its end kept (the model part of provider/model)."""
    fits = int(width_px / CHAR_PX) - 1
    return name if len(name) <= fits else "…" + name[-(fits - 1) :]


def _scores_table(stats: Sequence[ModelStats]) -> str:
    """One row per model: the share of feedback up, and the mean of each score name."""
    names = sorted({name for s in stats for name in s.scores})
    if not names:
        return "<p>no scores (multillm logs score, Client.score)</p>"
    head = "<th>model</th><th>feedback up %</th>" + "".join(f"<th>{escape(n)} mean</th>" for n in names)
    rows = []
    for s in stats:
        share = "-" if s.feedback_up_share is None else f"{s.feedback_up_share * 100:.0f}% of {s.feedback}"
        means = [f"{m.mean:g} n={m.count}" if (m := s.scores.get(n)) else "-" for n in names]
        cells = "".join(f'<td class="n">{escape(v)}</td>' for v in [share, *means])
        rows.append(f"<tr><td>{escape(s.model_name)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _charts(records: Sequence[LLMLogRecord]) -> str:
    groups = {name: ok_latencies(group) for name, group in by_model(records).items()}
    everything = [v for values in groups.values() for v in values]
    if not everything:
        return "<p>no successful calls</p>"
    # One x scale for every model, so their charts compare at a glance.
    top = max(everything) or 1.0
    figures = [
        f"<figure><figcaption>{escape(name)}</figcaption>{histogram(values, top)}</figure>"
        for name, values in groups.items()
    ]
    return f'<div class="charts">{"".join(figures)}</div>'


def histogram(latencies: Sequence[float], top: float) -> str:
    """An SVG histogram of `latencies` (sorted) over 0..`top` ms, with p50/p95/p99 marked."""
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - MARGIN - PLOT_TOP
    bottom = PLOT_TOP + plot_h
    counts = [0] * BINS
    for value in latencies:
        counts[min(BINS - 1, int(value / top * BINS))] += 1
    tallest = max(counts) or 1
    bar_w = plot_w / BINS
    shapes = []
    for i, count in enumerate(counts):
        h = count / tallest * plot_h
        x, y = MARGIN + i * bar_w, bottom - h
        shapes.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" fill="#4a7fb5">'
            f"<title>{count} calls</title></rect>"
        )
    marks = ((0.50, "#2a2"), (0.95, "#d80"), (0.99, "#c22"))
    for row_y, (q, colour) in zip(LABEL_ROWS_Y, marks, strict=True):
        mark = percentile(latencies, q)
        if mark is None:
            continue
        x = MARGIN + min(mark, top) / top * plot_w
        shapes.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{row_y - 9}" y2="{bottom}" stroke="{colour}"/>'
            + _label(x, row_y, f"p{round(q * 100)} {format_ms(mark)} ms")
        )
    axis = (
        f'<line x1="{MARGIN}" x2="{MARGIN + plot_w}" y1="{bottom}" y2="{bottom}" stroke="#888"/>'
        f'<text x="{MARGIN}" y="{HEIGHT - 8}">0 ms</text>'
        f'<text x="{MARGIN + plot_w}" y="{HEIGHT - 8}" text-anchor="end">{format_ms(top)} ms</text>'
        f'<text x="{MARGIN}" y="{CAPTION_Y}">{len(latencies)} call{"" if len(latencies) == 1 else "s"},'
        f" tallest bar {tallest}</text>"
    )
    return (
        f'<svg width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img">{axis}{"".join(shapes)}</svg>'
    )


def _label(x: float, y: int, text: str) -> str:
    """`text` beside the line at `x`: on its right if it fits inside the chart, else on its left."""
    if x + 3 + len(text) * CHAR_PX <= WIDTH:
        return f'<text x="{x + 3:.1f}" y="{y}">{escape(text)}</text>'
    return f'<text x="{x - 3:.1f}" y="{y}" text-anchor="end">{escape(text)}</text>'


def _answers(group: Sequence[LLMLogRecord], scored: Mapping[str, list[LLMScore]]) -> str:
    """One request: its prompt, then one column per model."""
    head = group[0]
    prompt = next((m.content for m in reversed(head.messages) if m.role == "user"), None)
    prompt_text = prompt if isinstance(prompt, str) else "(structured content)"
    header = "".join(f"<th>{escape(model_label(r))}</th>" for r in group)
    body = "".join(
        f"<tr><th>{label}</th>"
        + "".join(
            f"<td{' class=error' if r.status != 'ok' else ''}>{escape(cell)}</td>"
            for r, cell in zip(group, cells, strict=True)
        )
        + "</tr>"
        for label, cells in side_by_side_rows(group, scored)
    )
    return (
        f"<h3>{escape(head.request_id)} <small>{escape(request_created_at(group))} {escape(head.mode)}</small></h3>"
        f"<p><b>prompt:</b> {escape(prompt_text)}</p>"
        f'<table class="answers"><tr><th></th>{header}</tr>{body}</table>'
    )

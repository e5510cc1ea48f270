"""`multillm logs list|show|stats|report` on real sinks filled with records."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from multillm.cli import main
from multillm.cli.report import render_report
from multillm.cli.summaries import summarize
from multillm.config import ENV_SINK_URL
from multillm.schemas import ChatMessage, LLMLogRecord, LogAttribute, V1ChatCompletionMessage, V1Choice
from multillm.sinks import open_sink

HOSTILE = '<script src="https://evil.example/x.js"></script>[bold]&amp;'


def answer(
    request: int, index: int, model: str, content: str, *, latency: float, status: str = "ok", **fields: object
) -> LLMLogRecord:
    ok = status == "ok"
    return LLMLogRecord(
        log_id=f"log-{request}-{index}",
        request_id=f"req-{request}",
        model_name=model,
        model_index=index,
        is_primary=index == 0,
        status=status,  # type: ignore[arg-type]
        error_code=None if ok else 14,
        error_message=None if ok else "upstream unavailable",
        messages=[ChatMessage(role="user", content=f"question {request}")],
        output=[V1Choice(index=0, message=V1ChatCompletionMessage(content=content))] if ok else None,
        prompt_tokens=10 if ok else None,
        completion_tokens=request + index if ok else None,
        total_tokens=10 + request + index if ok else None,
        latency_ms=latency,
        attempts=1 if ok else 4,
        created_at=f"2026-11-{20 + request:02d}T10:00:00.000Z",
        **fields,  # type: ignore[arg-type]
    )


RECORDS = [
    answer(1, 0, "mock/alpha", "alpha one", latency=100, mode="MODE_PROD", time_to_first_token_ms=40),
    answer(1, 1, "mock/beta", HOSTILE, latency=300, mode="MODE_PROD"),
    answer(2, 0, "mock/alpha", "alpha two", latency=120, mode="MODE_TEST", trace_id="trace-2"),
    answer(2, 1, "mock/beta", "", latency=900, status="error", mode="MODE_TEST", trace_id="trace-2"),
    answer(
        3, 0, "mock/alpha", "alpha three", latency=140, session_id="sess-3", log_attributes=[LogAttribute("exp", "b")]
    ),
]


@pytest.fixture(params=["jsonl", "sqlite", "postgres"])
def sink_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    from tests.conftest import empty_sink_url

    return empty_sink_url(request.param, tmp_path, request)


@pytest.fixture
def filled(sink_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    sink = open_sink(sink_url)
    try:
        assert all(sink.write_many(RECORDS))
    finally:
        sink.close()
    monkeypatch.setenv(ENV_SINK_URL, sink_url)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)  # no multillm.toml of the developer's
    return sink_url


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["logs", *args]) == 0
    return capsys.readouterr().out


def test_list_json_filters(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    listed = json.loads(run(capsys, "list", "--json"))
    assert [s["request_id"] for s in listed] == ["req-3", "req-2", "req-1"]
    assert listed[1] == {
        "request_id": "req-2",
        "created_at": "2026-11-22T10:00:00.000Z",
        "mode": "MODE_TEST",
        "models": ["mock/alpha", "mock/beta"],
        "statuses": ["ok", "error"],
        "primary": "mock/alpha",
        "cost_usd": None,
    }
    cases = {
        ("--mode", "test"): ["req-2"],
        ("--model", "mock/beta"): ["req-2", "req-1"],
        ("--trace", "trace-2"): ["req-2"],
        ("--session", "sess-3"): ["req-3"],
        ("--attr", "exp=b"): ["req-3"],
        ("--since", "2026-11-22"): ["req-3", "req-2"],
        ("--until", "2026-11-22"): ["req-2", "req-1"],
        ("--until", "2026-11-22T00:00"): ["req-1"],
        ("--limit", "1"): ["req-3"],
    }
    for flags, expected in cases.items():
        assert [s["request_id"] for s in json.loads(run(capsys, "list", "--json", *flags))] == expected, flags


def test_list_table(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "list", "--model", "mock/beta")
    assert "req-1" in out and "req-2" in out and "req-3" not in out
    assert "mock/beta (error)" in out


def test_show_puts_every_model_side_by_side(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "show", "req-1")
    assert "mock/alpha (primary)" in out and "mock/beta" in out
    assert "alpha one" in out and "300 ms" in out and "10 / 2" in out
    assert "100 ms (first token 40 ms)" in out  # a streamed call: its time to first token too
    assert "[bold]" in out  # model output is shown as it is, not read as rich markup
    shown = json.loads(run(capsys, "show", "req-2", "--json"))
    assert [(r["model_name"], r["status"]) for r in shown] == [("mock/alpha", "ok"), ("mock/beta", "error")]


def test_stats(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    stats = {s["model_name"]: s for s in json.loads(run(capsys, "stats", "--json"))}
    assert stats["mock/alpha"] == {
        "model_name": "mock/alpha",
        "records": 3,
        "errors": 0,
        "error_rate": 0.0,
        "latency_ms_p50": 120.0,
        "latency_ms_p95": 140.0,
        "latency_ms_p99": 140.0,
        # One of its calls was streamed, 40 ms to its first token.
        "time_to_first_token_ms_p50": 40.0,
        "prompt_tokens": 30,
        "completion_tokens": 6,
        "mean_total_tokens": 12.0,
        "mean_attempts": 1.0,
        # These records were written without prices.
        "priced": 0,
        "cost_usd": None,
        "mean_cost_usd": None,
        "cost_per_1k_requests_usd": None,
        # Nor scored.
        "feedback": 0,
        "feedback_up_share": None,
        "scores": {},
    }
    beta = stats["mock/beta"]
    assert (beta["records"], beta["errors"], beta["error_rate"]) == (2, 1, 0.5)
    assert beta["latency_ms_p99"] == 300.0  # the failed call's 900 ms is retry time, not model latency
    filtered = json.loads(run(capsys, "stats", "--json", "--mode", "MODE_TEST"))
    assert [(s["model_name"], s["records"]) for s in filtered] == [("mock/alpha", 1), ("mock/beta", 1)]
    table = run(capsys, "stats")
    assert re.search(r"mock/beta .*2 .*1 .*50\.0", table)


def test_report_is_one_self_contained_escaped_page(
    filled: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "report.html"
    assert "5 records, 3 requests" in run(capsys, "report", "--html", str(path))
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "mock/alpha" in page and "mock/beta" in page
    # one latency chart per model, and the paired calls' two of the comparison of the models
    assert page.count("<svg") == 4
    assert "(candidate) against mock/" in page
    assert "alpha three" in page and "upstream unavailable" in page
    assert "&lt;script src=&quot;https://evil.example/x.js&quot;&gt;" in page
    assert "<script" not in page
    # The only URL is the escaped text of the model's answer: nothing is loaded from anywhere.
    assert "http://" not in page and page.count("https://") == 1
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)

    recent = tmp_path / "recent.html"
    run(capsys, "report", "--html", str(recent), "--recent", "1", "--model", "mock/alpha")
    page = recent.read_text()
    assert "alpha three" in page and "alpha one" not in page  # only the newest request's answers
    assert "mock/beta" not in page


def test_bad_since_is_a_clear_error_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "multillm", "logs", "list", "--since", "last tuesday"],
        env={**os.environ, ENV_SINK_URL: f"sqlite:///{tmp_path}/logs.db"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "argument --since: 'last tuesday' is not an ISO-8601 date" in done.stderr


# Fractional latencies, and a model whose every percentile is the slowest call of all (the
# right edge of every chart), where a label drawn to the right of its line would run out.
UNEVEN = [
    answer(1, 0, "mock/alpha", "a", latency=175.1),
    answer(1, 1, "mock/beta", "b", latency=175.5),
    answer(2, 0, "mock/alpha", "a", latency=99.94),
    answer(2, 1, "mock/beta", "b", latency=6522.78),
    answer(3, 0, "mock/alpha", "a", latency=1234.56),
]
# The widest a character of the charts' 10px sans-serif is drawn (DejaVu Sans digits are 6.4px).
CHAR_PX = 6.5


def svg_texts(page: str) -> list[tuple[float, str, str, float]]:
    """(x, text-anchor, text, viewBox width) of every label in every chart of the page."""
    found = []
    for box, body in re.findall(r'<svg [^>]*viewBox="0 0 (\d+) \d+"[^>]*>(.*?)</svg>', page, re.DOTALL):
        for attributes, text in re.findall(r"<text ([^>]*)>([^<]*)</text>", body):
            x = float(re.search(r'x="([\d.]+)"', attributes)[1])  # type: ignore[index]
            anchor = m[1] if (m := re.search(r'text-anchor="(\w+)"', attributes)) else "start"
            found.append((x, anchor, html.unescape(text), float(box)))
    return found


def test_report_labels_stay_inside_their_charts() -> None:
    texts = svg_texts(render_report(UNEVEN))
    assert sum(1 for _, _, text, _ in texts if text.startswith("p99 ")) == 2  # one per model
    for x, anchor, text, width in texts:
        extent = len(text) * CHAR_PX
        left, right = {"start": (x, x + extent), "end": (x - extent, x), "middle": (x - extent / 2, x + extent / 2)}[
            anchor
        ]
        assert left >= 0 and right <= width, f"{text!r} spans {left:.0f}..{right:.0f} of 0..{width:.0f}"


def test_latencies_are_whole_milliseconds_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    page = render_report(UNEVEN)
    shown = re.findall(r"([\d.]+) ms", page)  # the charts' marks and axes, the answers' latency rows
    assert {"175", "176", "100", "6523", "1235"} <= set(shown)
    assert all(value.isdigit() for value in shown), shown
    [beta] = [row for row in re.findall(r"<tr>(.*?)</tr>", page) if row.startswith("<td>mock/beta")]
    assert re.findall(r'<td class="n">([^<]*)</td>', beta)[3:6] == ["176", "6523", "6523"]  # p50, p95, p99

    sink = open_sink(f"sqlite:///{tmp_path}/logs.db")
    try:
        assert all(sink.write_many(UNEVEN))
    finally:
        sink.close()
    monkeypatch.setenv(ENV_SINK_URL, f"sqlite:///{tmp_path}/logs.db")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)  # no multillm.toml of the developer's
    stats = run(capsys, "stats")
    show = run(capsys, "show", "req-2")
    assert re.search(r"mock/beta\D+2\D+0\D+0\.0\D+176\D+6523\D+6523\D", stats), stats
    assert "100 ms" in show and "6523 ms" in show
    assert not re.search(r"\d\.\d+ ms", show + stats)


def test_a_request_has_the_same_time_in_the_report_as_in_logs_list() -> None:
    # Each model's record is created when its call starts: here the primary's came last.
    records = [
        msgspec.structs.replace(answer(5, 0, "mock/alpha", "a", latency=10), created_at="2026-11-25T10:00:02.500Z"),
        msgspec.structs.replace(answer(5, 1, "mock/beta", "b", latency=10), created_at="2026-11-25T10:00:00.250Z"),
    ]
    [summary] = summarize(records)
    [heading] = re.findall(r"<h3>req-5 <small>(\S+) ", render_report(records))
    assert heading == summary.created_at == "2026-11-25T10:00:00.250Z"

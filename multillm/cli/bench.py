"""`multillm bench`: run the scenarios, print the tables, keep them in docs/benchmarks.md."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from multillm.bench import report
from multillm.bench.runner import run_bench
from multillm.config import Settings


def run_bench_command(
    settings: Settings,
    *,
    only: list[str],
    quick: bool,
    output: str | None,
    postgres_url: str | None,
) -> int:
    sections = run_bench(
        settings.broker_url,
        only=only,
        quick=quick,
        postgres_url=postgres_url,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(report.text(sections))
    if output:
        page = Path(output)
        chart = page.with_suffix(".png")
        drew = report.chart(sections, chart)
        command = "multillm " + shlex.join(sys.argv[1:])
        report.write_markdown(page, report.markdown(sections, command, chart.name if drew else None))
        print(f"wrote {page}" + (f" and {chart}" if drew else ""), file=sys.stderr)
    return 0

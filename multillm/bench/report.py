"""The benchmark's output: tables on the terminal, a section of docs/benchmarks.md, a PNG chart.

Only the part of docs/benchmarks.md between the markers is rewritten, so the
analysis written around the figures survives a new run.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from multillm.bench.common import Section
from multillm.bench.drive import percentile

START: Final = "<!-- bench:start -->"
END: Final = "<!-- bench:end -->"
_PERCENTILES: Final = (0.5, 0.9, 0.99)


def text(sections: Sequence[Section]) -> str:
    """Aligned tables and verdicts, for a terminal."""
    out: list[str] = []
    for section in sections:
        widths = [max(len(h), *(len(r[i]) for r in section.rows)) for i, h in enumerate(section.headers)]
        out.append(section.title)
        for row in (section.headers, *section.rows):
            out.append("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        out += [f"  {v}" for v in section.verdicts]
        out.append("")
    return "\n".join(out)


def markdown(sections: Sequence[Section], command: str, chart: str | None) -> str:
    """The generated part of docs/benchmarks.md: the machine, then one table per scenario."""
    out = [START, "", f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}`.", "", *_machine(), ""]
    if chart:
        out += [f"![latency percentiles]({chart})", ""]
    for section in sections:
        out += [f"### {section.title}", ""]
        out.append("| " + " | ".join(section.headers) + " |")
        out.append("|" + "---|" * len(section.headers))
        out += ["| " + " | ".join(row) + " |" for row in section.rows]
        out.append("")
        out += [f"- {v}" for v in section.verdicts]
        out += [f"- {n}" for n in section.notes]
        out.append("")
    out.append(END)
    return "\n".join(out)


def write_markdown(path: Path, generated: str) -> None:
    """Replace the generated part of `path` (or create the file around it)."""
    old = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in old:
        old += f"\n{START}\n{END}\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    path.write_text(pattern.sub(lambda _: generated, old, count=1))


def _machine() -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    memory_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {memory_kb / 1024**2:.0f} GiB",
        f"- {platform.platform()}; Python {platform.python_version()}",
        f"- RabbitMQ {_version(['rabbitmqctl', '-q', 'version'])}; mock LLM, workers and driver on this one machine",
    ]


def _version(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip() or "?"
    except OSError:
        return "?"


def chart(sections: Sequence[Section], path: Path) -> bool:
    """Latency percentiles of every sampled series as grouped bars; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sampled = [s for s in sections if s.samples]
    if not sampled:
        return False
    fig, axes = plt.subplots(1, len(sampled), figsize=(6 * len(sampled), 4.5), squeeze=False)
    for ax, section in zip(axes[0], sampled, strict=True):
        names = list(section.samples)
        width = 0.8 / len(_PERCENTILES)
        for k, q in enumerate(_PERCENTILES):
            values = [percentile(section.samples[n], q) for n in names]
            ax.bar([i + k * width for i in range(len(names))], values, width, label=f"p{q * 100:g}")
        ax.set_xticks([i + width for i in range(len(names))], names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("latency, ms")
        ax.set_title(section.title.split(":")[0], fontsize=10)
        # Headroom above the tallest bar, so that the legend's row never hides one.
        ax.set_ylim(top=ax.get_ylim()[1] * 1.15)
        ax.legend(fontsize=8, loc="upper left", ncol=len(_PERCENTILES))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

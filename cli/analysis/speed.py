"""Speed figures for the report: from the runs themselves, and from docs/benchmarks.md."""

from __future__ import annotations

import re
from pathlib import Path

from labctl.cli.analysis.grouping import Block
from labctl.cli.analysis.stats import group_figures


def run_speed_rows(blocks: list[Block], by: str = "optimizer"
                   ) -> tuple[list[str], list[list[str]]]:
    """Mean training throughput per (setup, group), and each relative to the slowest row.

    Times are the training pass only (the runner's epoch_seconds), so evaluation does not
    blur the comparison.
    """
    header = ["setup", by, "device", "train images/epoch", "s/epoch", "img/s",
              "x slowest"]
    raw = []
    for block in blocks:
        for group in block.groups:
            figures = group_figures(group)
            first = group.runs[0]
            train_size = (first.summary or {}).get("train_size")
            raw.append((block.label, group.label, str(first.spec.get("device", "?")),
                        str(train_size) if train_size is not None else "?",
                        figures["seconds_per_epoch"], figures["images_per_second"]))
    slowest = min((r[5].mean for r in raw if r[5].mean), default=None)
    rows = []
    for setup, group, device, size, seconds, ips in raw:
        ratio = f"{ips.mean / slowest:.1f}" if slowest and ips.mean else "n/a"
        rows.append([setup, group, device, size, _mean_std(seconds, 2), _mean_std(ips, 0),
                     ratio])
    return header, rows


def _mean_std(agg, places: int) -> str:
    if agg.mean is None:
        return "n/a"
    text = f"{agg.mean:.{places}f}"
    return text + (f" ± {agg.std:.{places}f}" if agg.std is not None else "")


_HEADING = re.compile(r"^(#{1,6})\s")


def benchmark_sections(path: Path, depth: int = 4) -> str | None:
    """docs/benchmarks.md minus its title, headings pushed down to ``depth`` so they nest
    under the report's speed section; None when the file is absent or empty."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):  # absent, or not a text file: no section
        return None
    lines = []
    for line in text.splitlines():
        if line.startswith("<!--"):
            continue  # the per-benchmark section markers
        match = _HEADING.match(line)
        if match and len(match.group(1)) == 1:
            continue  # the page title
        if match:
            level = min(6, len(match.group(1)) - 2 + depth)
            line = "#" * level + line[len(match.group(1)):]
        lines.append(line)
    body = "\n".join(lines).strip()
    return body or None

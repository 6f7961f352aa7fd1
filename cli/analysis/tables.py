"""The comparison table, rendered as aligned text (terminal) or Markdown (report)."""

from __future__ import annotations

from labctl.cli.analysis.grouping import Block
from labctl.cli.analysis.stats import FIGURES, Aggregate, group_figures

#: Decimal places per figure: scores to 4, epochs to 1, times to 3 significant-ish.
_DECIMALS = {"final_accuracy": 4, "best_accuracy": 4, "final_f1": 4, "best_f1": 4,
             "epochs_to_95": 1, "seconds_per_epoch": 2, "images_per_second": 0}


def format_aggregate(key: str, agg: Aggregate) -> str:
    if agg.mean is None:
        return "n/a"
    places = _DECIMALS[key]
    if agg.n == 1 and key == "epochs_to_95":
        return f"{agg.mean:.0f}"
    text = f"{agg.mean:.{places}f}"
    if agg.std is not None:
        text += f" ± {agg.std:.{places}f}"
    return text


def format_seeds(seeds: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3,7"``: ten seeds should not widen the table."""
    parts: list[str] = []
    ordered = sorted(seeds)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ordered[i]}-{ordered[j]}")
        else:
            parts.extend(str(s) for s in ordered[i:j + 1])
        i = j + 1
    return ",".join(parts)


def comparison_rows(blocks: list[Block]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per group: figures are mean ± std (sample std) across seeds."""
    by = blocks[0].groups[0].field if blocks and blocks[0].groups else "group"
    header = ["setup", by, "seeds"] + [label for _, label in FIGURES]
    rows = []
    for block in blocks:
        for group in block.groups:
            figures = group_figures(group)
            seeds = format_seeds([run.seed for run in group.runs])
            rows.append([block.label, group.label, f"{len(group.runs)} ({seeds})"]
                        + [format_aggregate(key, figures[key]) for key, _ in FIGURES])
    if len(blocks) == 1:  # one setup: the column would repeat one label
        header, rows = header[1:], [row[1:] for row in rows]
    return header, rows


#: The narrowest a "setup" cell is abbreviated to before the table is split instead.
MIN_SETUP_WIDTH = 16


def render_text(header: list[str], rows: list[list[str]], width: int | None = None) -> str:
    """A plain table. With ``width`` (the terminal's), it fits: a long ``setup`` column is
    abbreviated first (its full text stays in --json), then the figure columns are split
    into stacked tables that repeat the columns naming each row."""
    if width is None or _table_width(header, rows) <= width:
        return _render(header, rows)
    if header[0] == "setup":
        others = _table_width(header[1:], [row[1:] for row in rows]) + 2
        room = max(MIN_SETUP_WIDTH, width - others)
        rows = [[_abbreviate(row[0], room), *row[1:]] for row in rows]
    if _table_width(header, rows) <= width:
        return _render(header, rows)
    keys = header.index("seeds") + 1 if "seeds" in header else 1
    parts, columns = [], list(range(keys, len(header)))
    while columns:
        chunk = [columns.pop(0)]
        while columns and _table_width(*_pick(header, rows, keys, chunk + columns[:1])) <= width:
            chunk.append(columns.pop(0))
        parts.append(_render(*_pick(header, rows, keys, chunk)))
    return "\n\n".join(parts)


def _pick(header: list[str], rows: list[list[str]], keys: int, columns: list[int]
          ) -> tuple[list[str], list[list[str]]]:
    wanted = list(range(keys)) + columns
    return [header[i] for i in wanted], [[row[i] for i in wanted] for row in rows]


def _abbreviate(text: str, room: int) -> str:
    return text if len(text) <= room else text[:room - 1] + "…"


def _table_width(header: list[str], rows: list[list[str]]) -> int:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return sum(widths) + 2 * (len(widths) - 1)


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|",
                      *(line(row) for row in rows)])

"""refs -> runs -> blocks -> figures and tests: the part compare and report share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labctl.cli.analysis.grouping import Block, make_blocks
from labctl.cli.analysis.runs import Selection, select_runs
from labctl.cli.analysis.stats import PairedTest, block_tests, group_figures


class NothingToCompare(ValueError):
    pass


@dataclass
class Analysis:
    by: str
    blocks: list[Block]
    tests: dict[int, list[PairedTest]]  # block index -> its tests
    selection: Selection
    notes: list[str]                    # runs left out, and why

    def to_json(self) -> dict[str, Any]:
        blocks = []
        for i, block in enumerate(self.blocks):
            groups = [{"value": g.value, "label": g.label,
                       "job_ids": [r.job_id for r in g.runs],
                       "seeds": [r.seed for r in g.runs],
                       "figures": {k: a.as_dict() for k, a in group_figures(g).items()}}
                      for g in block.groups]
            blocks.append({"label": block.label, "fields": block.fields, "groups": groups,
                           "tests": [t.as_dict() for t in self.tests[i]]})
        return {"by": self.by, "blocks": blocks, "skipped": self.notes}


def analyse(refs: list[str], root: str | Path, by: str = "optimizer") -> Analysis:
    """Raises RunNotFound (unknown ref), BadField (bad ``by``), NothingToCompare."""
    selection = select_runs(refs, root)
    if not selection.runs:
        reasons = "; ".join(selection.skipped) or "no runs"
        raise NothingToCompare(f"no finished runs to compare ({reasons})")
    blocks, dropped = make_blocks(selection.runs, by)
    tests = {i: block_tests(block) for i, block in enumerate(blocks)}
    return Analysis(by, blocks, tests, selection, selection.skipped + dropped)

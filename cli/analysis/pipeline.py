"""refs -> runs -> blocks -> figures and tests: the part compare and report share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.cli.analysis.grouping import Block, make_blocks
from labctl.cli.analysis.robust import DEFAULT_TARGET, apply_holm, group_robust, robust_tests
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
    target: float = DEFAULT_TARGET
    #: block index -> medians with bootstrap CIs per group, and their paired tests
    robust: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        blocks = []
        for i, block in enumerate(self.blocks):
            groups = [{"value": g.value, "label": g.label,
                       "job_ids": [r.job_id for r in g.runs],
                       "seeds": [r.seed for r in g.runs],
                       "figures": {k: a.as_dict() for k, a in group_figures(g).items()}}
                      for g in block.groups]
            robust = self.robust[i]
            blocks.append({"label": block.label, "fields": block.fields, "groups": groups,
                           "tests": [t.as_dict() for t in self.tests[i]],
                           "robust": {
                               "target": self.target,
                               "groups": {label: {k: v.as_dict() if hasattr(v, "as_dict")
                                                  else v for k, v in figures.items()}
                                          for label, figures in robust["groups"].items()},
                               "tests": [t.as_dict() for t in robust["tests"]]}})
        return {"by": self.by, "blocks": blocks, "skipped": self.notes}


def analyse(refs: list[str], root: str | Path, by: str = "optimizer",
            target: float = DEFAULT_TARGET) -> Analysis:
    """Raises RunNotFound (unknown ref), BadField (bad ``by``), NothingToCompare.
    ``target``: the test accuracy whose time to reach is reported (robust.py)."""
    selection = select_runs(refs, root)
    if not selection.runs:
        reasons = "; ".join(selection.skipped) or "no runs"
        raise NothingToCompare(f"no finished runs to compare ({reasons})")
    blocks, dropped = make_blocks(selection.runs, by)
    tests = {i: block_tests(block) for i, block in enumerate(blocks)}
    robust = {i: {"groups": {g.label: group_robust(g, target) for g in block.groups},
                  "tests": robust_tests(block, target)} for i, block in enumerate(blocks)}
    # Several workloads at once: each figure's p-values are corrected together.
    apply_holm(list(tests.values()))
    apply_holm([r["tests"] for r in robust.values()])
    return Analysis(by, blocks, tests, selection, selection.skipped + dropped, target, robust)

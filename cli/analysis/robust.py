"""Medians, bootstrap confidence intervals, time to target and Holm's correction: the
figures of a tuned comparison (few seeds, skewed scores, several workloads at once).

Time to target is AlgoPerf's measure: the first epoch whose test accuracy reaches a fixed
target. A run that never reaches it counts as never (``inf``): it ranks behind every run
that got there, so the median is "never" when most runs miss. In the paired tests a miss
stands as one epoch past the run's last, which ranks it the same way in the Wilcoxon test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from labctl.cli.analysis.grouping import Block, Group
from labctl.cli.analysis.runs import Run
from labctl.cli.analysis.stats import PairedTest, run_paired_tests

DEFAULT_TARGET = 0.95
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
#: Fixed, so the same runs always give the same interval.
BOOTSTRAP_SEED = 0


def epochs_to_target(rows: list[dict[str, Any]], target: float) -> float:
    """First epoch whose test accuracy reaches ``target``; ``inf`` when none does."""
    return next((float(r["epoch"]) for r in rows if r["test_accuracy"] >= target), math.inf)


def _paired_stand_in(run: Run, target: float) -> float:
    value = epochs_to_target(run.metrics, target)
    return value if math.isfinite(value) else float(run.metrics[-1]["epoch"] + 1)


@dataclass
class MedianCI:
    """Median of ``values`` and its percentile-bootstrap interval (``inf`` allowed)."""

    values: list[float]
    median: float | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if not self.values:
            return
        x = np.asarray(self.values, dtype=float)
        self.median = float(np.median(x))
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        # (resamples, n) draws with replacement; np.median of a row with inf stays inf.
        medians = np.median(x[rng.integers(0, len(x), (BOOTSTRAP_RESAMPLES, len(x)))], axis=1)
        tail = (1 - CONFIDENCE) / 2
        # inverted_cdf picks order statistics: interpolating towards inf would give nan.
        low, high = np.quantile(medians, [tail, 1 - tail], method="inverted_cdf")
        self.low, self.high = float(low), float(high)

    def as_dict(self) -> dict[str, Any]:
        """JSON has no infinity: a "never" is null, with ``never`` saying which."""
        return {"median": _finite(self.median), "ci95": [_finite(self.low), _finite(self.high)],
                "n": len(self.values), "values": [_finite(v) for v in self.values],
                "never": [name for name, v in (("median", self.median), ("low", self.low),
                                               ("high", self.high))
                          if v is not None and math.isinf(v)]}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def group_robust(group: Group, target: float) -> dict[str, Any]:
    times = [epochs_to_target(run.metrics, target) for run in group.runs]
    return {"final_accuracy": MedianCI([run.metrics[-1]["test_accuracy"]
                                        for run in group.runs]),
            "epochs_to_target": MedianCI(times),
            "reached": sum(math.isfinite(t) for t in times), "runs": len(times)}


def robust_tests(block: Block, target: float) -> list[PairedTest]:
    """Final test accuracy and epochs to target, b - a, paired by seed, per group pair."""
    tests = []
    for a, b in combinations(block.groups, 2):
        a_runs, b_runs = a.by_seed(), b.by_seed()
        seeds = sorted(set(a_runs) & set(b_runs))
        for figure, label, value in (
                ("final_accuracy", "final test accuracy",
                 lambda run: run.metrics[-1]["test_accuracy"]),
                ("epochs_to_target", f"epochs to {target:g} test accuracy",
                 lambda run: _paired_stand_in(run, target))):
            test = PairedTest(figure, label, a.label, b.label, seeds,
                              [value(a_runs[s]) for s in seeds],
                              [value(b_runs[s]) for s in seeds])
            run_paired_tests(test)
            tests.append(test)
    return tests


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (``None``: not tested, left
    out of the family). Controls the family-wise error rate without independence."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    m = len(tested)
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def apply_holm(tests_per_block: list[list[PairedTest]]) -> None:
    """Per figure, over every workload (block) and group pair: the Wilcoxon p-values
    adjusted together, set on each test as ``holm_p_value`` (only with two or more)."""
    by_figure: dict[str, list[PairedTest]] = {}
    for tests in tests_per_block:
        for test in tests:
            by_figure.setdefault(test.figure, []).append(test)
    for family in by_figure.values():
        p_values = [t.wilcoxon_p_value for t in family]
        if sum(p is not None for p in p_values) < 2:
            continue
        for test, adjusted in zip(family, holm(p_values), strict=True):
            test.holm_p_value = adjusted
            test.holm_family = sum(p is not None for p in p_values)


def format_median(figure: MedianCI, places: int) -> str:
    def text(value: float | None) -> str:
        if value is None:
            return "n/a"
        return "never" if math.isinf(value) else f"{value:.{places}f}"

    return f"{text(figure.median)} [{text(figure.low)}, {text(figure.high)}]"

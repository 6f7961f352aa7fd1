"""Per-run figures, mean ± std across seeds, and paired significance tests.

The question the original lab could not answer with one run per optimizer: is the
difference bigger than seed-to-seed noise? Runs are paired by seed (same data subset,
same initial weights where the engine seeds them alike), so the test looks at the
per-seed differences, not at two independent samples.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from labctl.cli.analysis.grouping import Block, Group
from labctl.cli.analysis.runs import Run

ALPHA = 0.05
#: Fewer pairs than this and the exact two-sided Wilcoxon p-value cannot go below
#: 2/2**n = 0.0625 (n=5): the test could never reject at 0.05.
WILCOXON_MIN_PAIRS = 6
#: Differences closer than this are equal (float rounding of scores that are fractions).
ZERO_SPREAD = 1e-9
#: (key, column header) of every per-run figure, in table order.
FIGURES = [
    ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"),
    ("final_f1", "final F1"),
    ("best_f1", "best F1"),
    ("epochs_to_95", "epochs to 95% of best acc"),
    ("seconds_per_epoch", "s/epoch"),
    ("images_per_second", "img/s"),
]
#: Figures whose optimizer difference is tested.
TESTED = [("final_accuracy", "final test accuracy"), ("final_f1", "final test macro-F1")]


def epochs_to_fraction(rows: list[dict[str, Any]], key: str = "test_accuracy",
                       fraction: float = 0.95) -> int | None:
    """First epoch whose ``key`` reaches ``fraction`` of the run's best: how fast it converges."""
    if not rows:
        return None
    target = fraction * max(r[key] for r in rows)
    return next(r["epoch"] for r in rows if r[key] >= target)


def run_figures(run: Run) -> dict[str, float | None]:
    rows = run.metrics
    last = rows[-1]
    return {
        "final_accuracy": last["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in rows),
        "final_f1": last["test_f1_macro"],
        "best_f1": max(r["test_f1_macro"] for r in rows),
        "epochs_to_95": epochs_to_fraction(rows),
        "seconds_per_epoch": float(np.mean([r["epoch_seconds"] for r in rows])),
        "images_per_second": float(np.mean([r["images_per_second"] for r in rows])),
    }


@dataclass
class Aggregate:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1): the seeds are a sample of possible seeds."""
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else None

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


def group_figures(group: Group) -> dict[str, Aggregate]:
    per_run = [run_figures(run) for run in group.runs]
    return {key: Aggregate([r[key] for r in per_run if r[key] is not None])
            for key, _ in FIGURES}


@dataclass
class PairedTest:
    """``b - a`` for one figure over the seeds both groups ran."""

    figure: str
    figure_label: str
    a: str
    b: str
    seeds: list[int]
    a_values: list[float]
    b_values: list[float]
    t_statistic: float | None = None
    t_p_value: float | None = None
    t_note: str | None = None
    wilcoxon_statistic: float | None = None
    wilcoxon_p_value: float | None = None
    wilcoxon_note: str | None = None
    #: Holm-adjusted Wilcoxon p-value over the family of workloads compared (robust.py)
    holm_p_value: float | None = None
    holm_family: int = 0

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def diffs(self) -> list[float]:
        return [b - a for a, b in zip(self.a_values, self.b_values, strict=True)]

    @property
    def mean_diff(self) -> float | None:
        return float(np.mean(self.diffs)) if self.diffs else None

    @property
    def std_diff(self) -> float | None:
        return float(np.std(self.diffs, ddof=1)) if self.n >= 2 else None

    @property
    def tests_used(self) -> list[str]:
        used = []
        if self.t_p_value is not None:
            used.append("paired t-test")
        if self.wilcoxon_p_value is not None:
            used.append("Wilcoxon signed-rank")
        return used

    @property
    def significant(self) -> bool | None:
        """At :data:`ALPHA`, by the paired t-test (the Wilcoxon, when run, is reported too)."""
        return None if self.t_p_value is None else self.t_p_value < ALPHA

    def as_dict(self) -> dict[str, Any]:
        return {
            "figure": self.figure, "a": self.a, "b": self.b, "difference": f"{self.b} - {self.a}",
            "n_pairs": self.n, "seeds": self.seeds, "a_values": self.a_values,
            "b_values": self.b_values, "mean_diff": self.mean_diff, "std_diff": self.std_diff,
            "tests_used": self.tests_used,
            "t_test": {"test": "paired t-test (scipy.stats.ttest_rel, two-sided)",
                       "statistic": self.t_statistic, "p_value": self.t_p_value,
                       "note": self.t_note},
            "wilcoxon": {"test": "Wilcoxon signed-rank (scipy.stats.wilcoxon, two-sided)",
                         "statistic": self.wilcoxon_statistic,
                         "p_value": self.wilcoxon_p_value, "note": self.wilcoxon_note},
            "holm": {"correction": "Holm over every workload's Wilcoxon p-value of this "
                              "figure", "family_size": self.holm_family,
                     "p_value": self.holm_p_value},
            "alpha": ALPHA, "significant": self.significant,
        }


def paired_test(figure: str, figure_label: str, a: Group, b: Group) -> PairedTest:
    a_runs, b_runs = a.by_seed(), b.by_seed()
    seeds = sorted(set(a_runs) & set(b_runs))
    a_values = [run_figures(a_runs[s])[figure] for s in seeds]
    b_values = [run_figures(b_runs[s])[figure] for s in seeds]
    test = PairedTest(figure, figure_label, a.label, b.label, seeds, a_values, b_values)
    run_paired_tests(test)
    return test


def run_paired_tests(test: PairedTest) -> None:
    """Fill in the t-test and the Wilcoxon signed-rank test of ``test``'s pairs."""
    _t_test(test)
    _wilcoxon(test)


def _t_test(test: PairedTest) -> None:
    from scipy import stats  # scipy costs ~0.5 s to import; only compare/report need it

    if test.n < 2:
        test.t_note = f"not run: needs at least 2 seed pairs (have {test.n})"
        return
    diffs = test.diffs
    if max(diffs) - min(diffs) <= ZERO_SPREAD:
        # Zero variance: t is undefined (0/0 or ±inf). Scores are fractions like 47/50, so
        # "equal" differences can still disagree in the last bit and give an absurd p ~ 1e-16.
        test.t_note = (f"not defined: every seed pair differs by the same {diffs[0]:+.4g} "
                       "(zero variance)")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(test.b_values, test.a_values)
    test.t_statistic, test.t_p_value = float(result.statistic), float(result.pvalue)


def _wilcoxon(test: PairedTest) -> None:
    from scipy import stats

    if test.n < WILCOXON_MIN_PAIRS:
        test.wilcoxon_note = (f"not run: needs at least {WILCOXON_MIN_PAIRS} seed pairs "
                              f"(have {test.n})")
        if test.n >= 2:
            test.wilcoxon_note += (f"; with {test.n} its smallest possible two-sided p-value "
                                   f"is {2 / 2**test.n:.3g}, so it could not reach {ALPHA}")
        return
    if all(abs(d) <= ZERO_SPREAD for d in test.diffs):
        test.wilcoxon_note = "not defined: every seed pair is tied"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "exact p-value unavailable with ties"
        # On rounded differences: a last-bit difference must count as a tie (zero), as
        # it would with exact fractions.
        result = stats.wilcoxon(np.round(test.diffs, 12))
    test.wilcoxon_statistic = float(result.statistic)
    test.wilcoxon_p_value = float(result.pvalue)


def block_tests(block: Block) -> list[PairedTest]:
    """Every pair of groups in the block, for every tested figure."""
    return [paired_test(key, label, a, b)
            for a, b in combinations(block.groups, 2)
            for key, label in TESTED]


def format_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def describe_test(test: PairedTest) -> list[str]:
    """What was compared, which test, its statistic and p-value, and the verdict."""
    head = (f"{test.figure_label}: {test.b} - {test.a} = {_signed(test.mean_diff)} "
            f"(mean over {test.n} seed pair{'s' if test.n != 1 else ''}")
    head += f", std {test.std_diff:.4f})" if test.std_diff is not None else ")"
    if test.t_p_value is not None:
        verdict = "significant" if test.significant else "not significant"
        t_line = (f"paired t-test: t = {test.t_statistic:.3f}, p = {format_p(test.t_p_value)}"
                  f" -> {verdict} at {ALPHA}")
    else:
        t_line = f"paired t-test: {test.t_note}"
    if test.wilcoxon_p_value is not None:
        w_line = (f"Wilcoxon signed-rank: W = {test.wilcoxon_statistic:g}, "
                  f"p = {format_p(test.wilcoxon_p_value)}")
    else:
        w_line = f"Wilcoxon signed-rank: {test.wilcoxon_note}"
    lines = [head, t_line, w_line]
    if test.holm_p_value is not None:
        verdict = "significant" if test.holm_p_value < ALPHA else "not significant"
        lines.append(f"Holm over {test.holm_family} workloads: p = "
                     f"{format_p(test.holm_p_value)} -> {verdict} at {ALPHA}")
    return lines


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"

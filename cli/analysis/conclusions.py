"""Plain-language conclusions: what the numbers say, and how sure we can be."""

from __future__ import annotations

from labctl.cli.analysis.grouping import Block
from labctl.cli.analysis.stats import ALPHA, PairedTest, format_p, group_figures

PRETTY = {"adam": "Adam", "adamax": "AdaMax"}


def pretty(label: str) -> str:
    return PRETTY.get(label, label)


def block_conclusion(block: Block, tests: list[PairedTest]) -> str:
    """A paragraph per block, led by the final-accuracy test."""
    if len(block.groups) < 2:
        only = block.groups[0]
        return (f"Only {pretty(only.label)} ran in this setup ({len(only.runs)} run(s)); "
                "there is nothing to compare it with.")
    sentences = []
    for test in tests:
        if test.figure != "final_accuracy":
            continue
        sentences.append(_accuracy_sentence(test))
    acc = next((t for t in tests if t.figure == "final_accuracy"), None)
    f1 = next((t for t in tests if t.figure == "final_f1"), None)
    if acc is not None and f1 is not None and f1.t_p_value is not None:
        agrees = (acc.significant == f1.significant
                  and (acc.mean_diff or 0) * (f1.mean_diff or 0) >= 0)
        sentences.append(
            f"Macro-F1 {'agrees' if agrees else 'differs'}: {pretty(f1.b)} - {pretty(f1.a)} "
            f"= {f1.mean_diff:+.4f}, paired t-test p = {format_p(f1.t_p_value)} "
            f"({'significant' if f1.significant else 'not significant'} at {ALPHA}).")
    sentences.append(_convergence_sentence(block))
    return " ".join(s for s in sentences if s)


def _accuracy_sentence(test: PairedTest) -> str:
    a, b = pretty(test.a), pretty(test.b)
    if not test.n:
        return f"{a} and {b} share no seed, so they cannot be paired."
    # Means over the paired seeds only, so they agree with the difference quoted.
    a_mean, b_mean = sum(test.a_values) / test.n, sum(test.b_values) / test.n
    diff = test.mean_diff or 0.0
    leader, trailer = (b, a) if diff > 0 else (a, b)
    seeds = f"{test.n} paired seed{'s' if test.n != 1 else ''}"
    if diff:
        lead = (f"{leader} ended {abs(diff) * 100:.2f} accuracy points above {trailer} on "
                f"average over {seeds} ({a} {a_mean:.4f}, {b} {b_mean:.4f}).")
    else:
        lead = f"{a} and {b} ended with the same mean final accuracy ({a_mean:.4f}) over {seeds}."
    if test.t_p_value is None:
        return f"{lead} No significance test: the paired t-test was {test.t_note}."
    verdict = (f"The paired t-test gives t = {test.t_statistic:.2f}, p = "
               f"{format_p(test.t_p_value)}: ")
    if test.significant:
        verdict += (f"significant at {ALPHA}. On this setup the gap is larger than the "
                    "seed-to-seed variation, so it is unlikely to be luck of the seed.")
    else:
        verdict += (f"not significant at {ALPHA}. The gap is within seed-to-seed variation; "
                    f"these {test.n} seeds do not show that either optimizer is better.")
    if test.wilcoxon_p_value is not None:
        w_significant = test.wilcoxon_p_value < ALPHA
        verdict += (f" The Wilcoxon signed-rank test, which does not assume normal "
                    f"differences, gives p = {format_p(test.wilcoxon_p_value)} "
                    f"({'significant' if w_significant else 'not significant'}).")
    return f"{lead} {verdict}"


def _convergence_sentence(block: Block) -> str:
    parts = []
    for group in block.groups:
        agg = group_figures(group)["epochs_to_95"]
        if agg.mean is not None:
            parts.append(f"{pretty(group.label)} {agg.mean:.1f}")
    if not parts:
        return ""
    text = "Epochs to reach 95% of each run's best accuracy (mean): " + ", ".join(parts) + "."
    runs = [run for group in block.groups for run in group.runs]
    if all(_still_rising(run.metrics) for run in runs):
        text += (" Every run was still improving at its last epoch, so this compares early "
                 "training rather than converged models; longer runs may rank them "
                 "differently.")
    return text


def _still_rising(rows: list[dict]) -> bool:
    """The best test accuracy came at the last epoch, above the epoch before it."""
    return len(rows) >= 2 and rows[-1]["test_accuracy"] > max(r["test_accuracy"]
                                                              for r in rows[:-1])

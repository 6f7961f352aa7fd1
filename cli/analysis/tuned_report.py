"""The report's tuned comparison: a study's search space, budget and best configurations,
its plots, and the final runs of each best configuration on the test split.

Read from artefacts alone, like the rest of the report: ``labctl tune`` leaves a snapshot
of each study at ``<artifacts>/studies/<study>.json`` (settings, each optimizer's best
trial and every finished trial), and the final runs are the sweep ``<study>-final``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from labctl.cli.analysis.manifest import is_sweep_name
from labctl.cli.analysis.pipeline import Analysis
from labctl.cli.analysis.robust import format_median
from labctl.cli.analysis.stats import describe_test
from labctl.cli.analysis.study_plots import plot_study
from labctl.cli.analysis.tables import render_markdown
from labctl.shared.artifacts import read_json, write_json

STUDIES_DIR = "studies"


def snapshot_path(root: str | Path, study: str) -> Path:
    if not is_sweep_name(study):
        raise ValueError(f"invalid study name {study!r}")
    return Path(root) / STUDIES_DIR / f"{study}.json"


def write_snapshot(root: str | Path, snapshot: dict[str, Any]) -> Path:
    path = snapshot_path(root, snapshot["study"])
    write_json(path, snapshot)
    return path


def read_snapshot(root: str | Path, study: str) -> dict[str, Any] | None:
    return read_json(snapshot_path(root, study)) if is_sweep_name(study) else None


def _value(value: float | None, objective: str) -> str:
    if value is None or not math.isfinite(value):
        return "never" if objective != "accuracy" else "n/a"
    return f"{value:.4f}" if objective == "accuracy" else f"{value:g}"


def tuned_section(snapshot: dict[str, Any], final: Analysis | None, out: Path,
                  written: list[Path]) -> str:
    """Markdown for one study; its plots (and the final runs' box plot) go into ``out``."""
    study, objective = snapshot["study"], snapshot["objective"]
    base = snapshot["base"]
    what = ("the best validation accuracy over the epochs (maximised)" if objective == "accuracy"
            else f"the epochs until validation accuracy reached {snapshot['target']:g} "
                 "(minimised; a trial that never reached it counts as never)")
    lines = [f"## Tuned comparison: study `{study}`", "",
             f"Each optimizer got the same budget of {snapshot['trials']} trials of "
             f"{base['model']} on {base['dataset']} ({base['epochs']} epochs, batch "
             f"{base['batch_size']}, {base['lr_schedule']} schedule), over the same search "
             f"space, proposed by Optuna's TPE sampler with seed {snapshot['sampler']['seed']} "
             f"for every optimizer. A trial is scored on a validation split "
             f"({snapshot['validation']:g} of the training split, stratified), never on the "
             f"test split; the objective is {what}.", "",
             render_markdown(["hyperparameter", "range", "scale"],
                             [[r["name"], f"{r['low']:g} to {r['high']:g}",
                               "log-uniform" if r["log"] else "uniform"]
                              for r in snapshot["search_space"]]), ""]
    header = ["optimizer", "finished trials", "best value", "lr", "beta1", "beta2", "eps",
              "weight decay", "job"]
    rows = []
    for opt, entry in snapshot["optimizers"].items():
        best = entry["best"] or {}
        params = best.get("params") or {}
        rows.append([opt, str(entry["finished_trials"]),
                     _value(best.get("value"), objective) if best else "n/a",
                     *(f"{params[k]:.3g}" if k in params else "-"
                       for k in ("lr", "beta1", "beta2", "eps", "weight_decay")),
                     f"`{best.get('job_id')}`" if best else "-"])
    lines += ["Best configuration per optimizer:", "", render_markdown(header, rows), ""]
    plot = plot_study(snapshot, out / f"study_{study}.png")
    written.append(plot)
    lines += [f"![optimisation history and learning rate vs score of {study}]({plot.name})", ""]
    lines += _final_runs(study, final, out, written)
    return "\n".join(lines)


def _final_runs(study: str, final: Analysis | None, out: Path, written: list[Path]
                ) -> list[str]:
    if final is None:
        return ["No final runs yet: `labctl tune --study " + study + " --final-seeds 10` "
                "reruns each best configuration on the test split.", ""]
    from labctl.cli.analysis.plotting import plot_boxes

    seeds = sorted({r.seed for b in final.blocks for g in b.groups for r in g.runs})
    lines = ["### Final runs on the test split", "",
             f"Each optimizer's best configuration, retrained on the whole training split "
             f"over {len(seeds)} seeds (initial weights and data order vary with the seed) "
             f"and scored once on the test split. Median and percentile-bootstrap 95% "
             f"interval across seeds; time to target counts a run that never reached "
             f"{final.target:g} test accuracy as never; paired by seed, Wilcoxon "
             "signed-rank, with Holm's correction when several workloads are compared.", ""]
    lines += robust_markdown(final)
    box = plot_boxes(final.blocks, final.target, out / f"final_{study}.png")
    written.append(box)
    lines += ["", f"![final runs of {study} across seeds]({box.name})", ""]
    return lines


def robust_markdown(analysis: Analysis) -> list[str]:
    """Median [95% bootstrap CI] per group as a table, then the Wilcoxon tests (Holm)."""
    header = ["setup", analysis.by, "runs", "final test accuracy",
              f"epochs to {analysis.target:g}", "reached"]
    rows = []
    for i, block in enumerate(analysis.blocks):
        for label, figures in analysis.robust[i]["groups"].items():
            rows.append([block.label, label, str(figures["runs"]),
                         format_median(figures["final_accuracy"], 4),
                         format_median(figures["epochs_to_target"], 0),
                         f"{figures['reached']}/{figures['runs']}"])
    lines = [render_markdown(header, rows), ""]
    for i, block in enumerate(analysis.blocks):
        for test in analysis.robust[i]["tests"]:
            head, _, w_line, *holm = describe_test(test)
            lines.append(f"- **{block.label}**, {head}")
            lines += [f"  - {line}" for line in (w_line, *holm)]
    return lines

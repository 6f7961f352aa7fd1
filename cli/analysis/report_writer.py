"""Write ``report.md`` and the PNGs it references into one folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labctl.cli.analysis.conclusions import block_conclusion, pretty
from labctl.cli.analysis.environment import environment_markdown
from labctl.cli.analysis.grid import sweep_command
from labctl.cli.analysis.grouping import Block
from labctl.cli.analysis.pipeline import Analysis
from labctl.cli.analysis.plotting import plot_curves
from labctl.cli.analysis.speed import run_speed_rows
from labctl.cli.analysis.stats import ALPHA, WILCOXON_MIN_PAIRS, describe_test
from labctl.cli.analysis.tables import comparison_rows, format_seeds, render_markdown
from labctl.cli.analysis.tuned_report import robust_markdown, tuned_section
from labctl.shared.artifacts import atomic_path, utc_now
from labctl.shared.recipes import recipe_lr
from labctl.shared.spec import DEFAULT_LR, NATIVE_IMAGE_SIZE

CARS_COMMANDS = """\
labctl sweep --model resnet50 --dataset stanford-cars --data-root /data/stanford_cars \\
    --opt adam,adamax --seeds 3 --epochs 30 --amp > cars-sweep.txt
SWEEP=$(head -1 cars-sweep.txt)
# once the 6 jobs have finished (labctl compare "$SWEEP" lists all of them):
labctl report "$SWEEP" -o docs/report-cars"""


@dataclass
class ReportInputs:
    analysis: Analysis
    refs: list[str]
    environment: dict[str, Any]
    command: str                       # the labctl report line that made this report
    benchmarks_md: str | None = None   # docs/benchmarks.md, headings already nested
    benchmarks_source: str | None = None
    measured_md: str | None = None     # labctl report --bench, measured now
    #: --study: (study snapshot, analysis of its final runs or None) each
    studies: list[tuple[dict[str, Any], Analysis | None]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def write_report(inputs: ReportInputs, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    analysis = inputs.analysis
    sections = [
        _title(inputs),
        _summary(analysis),
        _setup(analysis.blocks),
        _results(analysis),
        *(tuned_section(snapshot, final, out, inputs.written)
          for snapshot, final in inputs.studies),
        _curves(analysis.blocks, out, inputs),
        _confusion(analysis.blocks, out, inputs),
        _speed(inputs),
        "## Environment\n\nThe machine that generated this report:\n\n"
        + environment_markdown(inputs.environment),
        _reproduce(inputs),
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n\n".join(s.strip() for s in sections if s) + "\n")
    inputs.written.append(path)
    return path


def _title(inputs: ReportInputs) -> str:
    runs = sum(len(g.runs) for b in inputs.analysis.blocks for g in b.groups)
    by = inputs.analysis.by
    what = "Adam vs AdaMax" if by == "optimizer" else f"Comparison by {by}"
    return (f"# {what}: convergence, accuracy and speed\n\n"
            f"Generated {utc_now()} by `{inputs.command}` from {runs} finished run(s). "
            f"Figures are the mean ± sample standard deviation across seeds; runs with the "
            f"same seed are paired for the significance tests (alpha = {ALPHA}).")


def _summary(analysis: Analysis) -> str:
    lines = ["## Conclusion", ""]
    if analysis.by == "optimizer":
        runs = [r for b in analysis.blocks for g in b.groups for r in g.runs]
        seeds = sorted({len(g.runs) for b in analysis.blocks for g in b.groups})
        intro = ("The original lab trained one run per optimizer and found it \"hard to judge "
                 "which optimizer is better\". Here every optimizer ran "
                 f"{' or '.join(map(str, seeds))} seeds per setup, and runs sharing a seed "
                 "(so the same initial weights and data order for both optimizers) are "
                 "compared pairwise.")
        if all(r.spec.get("lr") is None for r in runs):
            # The recipe's rate where the setup has one (shared/recipes.py), else Kingma
            # & Ba's: the Setup table lists the rate each ran at.
            intro += (" Each optimizer ran at its default learning rate (its recipe's for "
                      "the model and dataset, else Adam 0.001 and AdaMax 0.002 as Kingma & "
                      "Ba recommend; the Setup table gives each): each is compared as a user "
                      "would run it, not at one shared rate.")
        lines += [intro, ""]
    for i, block in enumerate(analysis.blocks):
        lines.append(f"**{block.label}.** {block_conclusion(block, analysis.tests[i])}")
        lines.append("")
    if analysis.notes:
        lines.append("Left out: " + "; ".join(analysis.notes) + ".")
    return "\n".join(lines)


def _setup(blocks: list[Block]) -> str:
    header = ["setup", "model", "dataset", "train / test images", "epochs", "batch",
              "learning rate", "schedule", "image size", "seeds", "device"]
    rows = []
    for block in blocks:
        first = block.groups[0].runs[0]
        spec, summary = first.spec, first.summary or {}
        rates = ", ".join(f"{g.label} {_lr(g.runs[0].spec)}" for g in block.groups)
        seeds = sorted({r.seed for g in block.groups for r in g.runs})
        size = spec.get("image_size") or NATIVE_IMAGE_SIZE.get(spec.get("dataset"), "?")
        rows.append([block.label, str(spec.get("model")), str(spec.get("dataset")),
                     f"{summary.get('train_size', '?')} / {summary.get('test_size', '?')}",
                     str(spec.get("epochs")), str(spec.get("batch_size")), rates,
                     str(spec.get("lr_schedule")), f"{size}x{size}",
                     format_seeds(seeds), str(spec.get("device"))])
    return "## Setup\n\n" + render_markdown(header, rows)


def _lr(spec: dict[str, Any]) -> str:
    lr = (spec.get("lr")
          or recipe_lr(spec.get("model"), spec.get("dataset"), spec.get("optimizer"))
          or DEFAULT_LR.get(spec.get("optimizer"), None))
    return f"{lr:g}" if lr else "?"


def _results(analysis: Analysis) -> str:
    lines = ["## Results", "", render_markdown(*comparison_rows(analysis.blocks)), "",
             "Epochs to 95% of best acc: the first epoch whose test accuracy reached 95% of "
             "that run's best, a measure of convergence speed.", "",
             "### Significance across seeds", "",
             f"Paired by seed: `scipy.stats.ttest_rel` (two-sided) with at least 2 pairs; "
             f"the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`) as well from "
             f"{WILCOXON_MIN_PAIRS} pairs, below which its exact p-value cannot reach {ALPHA}.",
             ""]
    for i, block in enumerate(analysis.blocks):
        for test in analysis.tests[i]:
            head, *rest = describe_test(test)
            lines.append(f"- **{block.label}**, {head}")
            lines.extend(f"  - {line}" for line in rest)
    lines += ["", "### Median and time to target", "",
              f"Median and percentile-bootstrap 95% interval across seeds of the final test "
              f"accuracy and of the epochs until test accuracy reached {analysis.target:g} "
              "(a run that never did counts as never), with their Wilcoxon tests:", "",
              *robust_markdown(analysis)]
    return "\n".join(lines)


def _curves(blocks: list[Block], out: Path, inputs: ReportInputs) -> str:
    lines = ["## Learning curves", "",
             "Mean over seeds per optimizer; the band is ±1 standard deviation.", ""]
    for curve, title in (("loss", "Loss (test solid, train dashed)"),
                         ("accuracy", "Test accuracy"), ("f1", "Test macro-F1")):
        path = plot_curves(blocks, [curve], out / f"{curve}.png", blocks_as_rows=False)
        inputs.written.append(path)
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return "\n".join(lines)


def _confusion(blocks: list[Block], out: Path, inputs: ReportInputs) -> str:
    from labctl.worker.plots import plot_confusion_matrix

    lines = ["## Confusion matrix of the best run", ""]
    used: set[str] = set()
    for i, block in enumerate(blocks):
        # Best by final accuracy: the stored confusion matrix is of the final weights.
        best, group = max(((r, g) for g in block.groups for r in g.runs),
                          key=lambda item: item[0].metrics[-1]["test_accuracy"])
        matrix_file = best.path / "confusion_matrix.npy"
        if not matrix_file.is_file():
            lines += [f"- {block.label}: best run {best.job_id} has no confusion_matrix.npy", ""]
            continue
        try:
            cm = np.load(matrix_file)
        except (ValueError, OSError, EOFError):  # torn or not a saved array
            cm = None
        if not isinstance(cm, np.ndarray) or cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            lines += [f"- {block.label}: best run {best.job_id} has an unreadable "
                      "confusion_matrix.npy", ""]
            continue
        names = confusion_class_names(best.summary or {}, len(cm))
        # The slug is cut short, so two long labels can share one: keep both PNGs.
        name = f"confusion_{block.slug}.png"
        name = f"confusion_{block.slug}-{i + 1}.png" if name in used else name
        used.add(name)
        path = plot_confusion_matrix(cm, names, out / name)
        inputs.written.append(path)
        accuracy = best.metrics[-1]["test_accuracy"]
        lines += [f"### {block.label}", "",
                  f"Best final test accuracy: job `{best.job_id}` ({pretty(group.label)}, "
                  f"seed {best.seed}), accuracy {accuracy:.4f}. Rows are true classes, "
                  "normalised to 1.", "", f"![confusion matrix]({path.name})", ""]
    return "\n".join(lines)


def _speed(inputs: ReportInputs) -> str:
    lines = ["## Speed", "", "### Measured during the runs", "",
             "Training pass only (evaluation excluded), mean over epochs and seeds; "
             "`x slowest` is throughput relative to the slowest row. These runs shared the "
             "machine's cores, so compare rows of one report rather than across machines.", "",
             render_markdown(*run_speed_rows(inputs.analysis.blocks, inputs.analysis.by))]
    if inputs.measured_md:
        lines += ["", "### Benchmarks measured for this report (`labctl bench`)", "",
                  inputs.measured_md]
    if inputs.benchmarks_md:
        lines += ["", f"### From `{inputs.benchmarks_source}`", "", inputs.benchmarks_md]
    return "\n".join(lines)


def _reproduce(inputs: ReportInputs) -> str:
    lines = ["## Reproduce", ""]
    manifests = inputs.analysis.selection.manifests
    if manifests:
        lines += ["The sweeps behind this report, rebuilt from their manifests (a re-run "
                  "creates new sweep ids: give those to `labctl report`):", "", "```sh"]
        lines += [sweep_command(m) for m in manifests]
        lines += [inputs.command, "```", ""]
    else:
        lines += ["```sh", inputs.command, "```", ""]
    lines += ["The lab's original experiment, ResNet50 on Stanford Cars with 3 seeds per "
              "optimizer, on a GPU host with the dataset under /data/stanford_cars "
              "(add `--local` to run it without the queue):", "", "```sh", CARS_COMMANDS,
              "```"]
    return "\n".join(lines)


def confusion_class_names(summary: dict, num_classes: int) -> list[str]:
    """The confusion matrix's row names, in label order. ``class_names`` is in label order;
    ``per_class_accuracy``'s keys (all an older summary has) were sorted when summary.json
    was written, which is not every dataset's label order (Stanford Cars' devkit order)."""
    names = list(summary.get("class_names") or summary.get("per_class_accuracy") or [])
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]

"""``labctl report``: the lab's README report, generated from runs' artefacts."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from labctl.cli.analysis.environment import environment
from labctl.cli.analysis.report_writer import ReportInputs, write_report
from labctl.cli.analysis.speed import benchmark_sections
from labctl.cli.compare import load_analysis
from labctl.cli.errors import BadSpec, NotFound
from labctl.cli.run import artifacts_dir_option
from labctl.shared.settings import get_settings

DEFAULT_BENCHMARKS = "docs/benchmarks.md"


@click.command(
    "report", short_help="Write a Markdown report: curves, tables, conclusion, speed and set-up.")
@click.argument("refs", nargs=-1, required=True, metavar="JOB|SWEEP|FOLDER...")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="folder for report.md and its PNGs (created if missing)")
@artifacts_dir_option
@click.option("--by", default="optimizer", show_default=True,
              help="spec field whose values are compared")
@click.option("--benchmarks", "benchmarks_file", type=click.Path(dir_okay=False),
              default=DEFAULT_BENCHMARKS, show_default=True,
              help="benchmark page whose figures are included when it exists")
@click.option("--study", "studies", multiple=True, metavar="STUDY",
              help="add a labctl tune study's tuned comparison (repeat for several)")
@click.option("--bench", "measure", is_flag=True,
              help="also measure NumPy vs PyTorch and ResNet50 throughput now (labctl bench "
                   "--quick; a few minutes on a CPU)")
def report(refs: tuple[str, ...], out_dir: str, artifacts_dir: str | None, by: str,
           benchmarks_file: str, studies: tuple[str, ...], measure: bool) -> None:
    """Write OUT/report.md with loss/accuracy/F1 curves per optimizer (std bands), the
    comparison table and significance test with a plain-language conclusion, the speed
    table, the best run's confusion matrix, the environment and how to reproduce it. With
    --study, each study's tuned comparison beside it: search space, budget, best
    configurations, optimisation history, lr vs score, and the final runs on the test split.
    """
    analysis = load_analysis(refs, artifacts_dir, by)
    inputs = ReportInputs(analysis=analysis, refs=list(refs), environment=environment(),
                          command=_command_line(refs, out_dir, artifacts_dir, by, measure,
                                                studies))
    inputs.studies = [_study(name, artifacts_dir) for name in studies]
    inputs.benchmarks_md = benchmark_sections(Path(benchmarks_file))
    inputs.benchmarks_source = benchmarks_file
    if measure:
        from labctl.cli.bench_cmd import measure_markdown

        click.echo("labctl: measuring benchmarks (--bench) ...", err=True)
        inputs.measured_md = measure_markdown(quick=True)
    try:
        path = write_report(inputs, Path(out_dir))
    except OSError as exc:
        raise BadSpec(f"cannot write the report to {out_dir}: {exc.strerror}") from None
    for written in inputs.written:
        click.echo(str(written))
    click.echo(f"labctl: report written to {path}", err=True)


def _study(name: str, artifacts_dir: str | None):
    """(snapshot, analysis of its final runs or None) of one ``--study``."""
    from labctl.cli.analysis.manifest import read_manifest
    from labctl.cli.analysis.tuned_report import read_snapshot
    from labctl.cli.tune_final import final_sweep_id

    root = artifacts_dir or get_settings().artifacts_dir
    snapshot = read_snapshot(root, name)
    if snapshot is None:
        raise NotFound(f"no study {name} under {root}/studies (labctl tune writes it there)")
    final = None
    if read_manifest(root, final_sweep_id(name)) is not None:
        final = load_analysis((final_sweep_id(name),), artifacts_dir, "optimizer",
                              snapshot["target"])
    return snapshot, final


def _command_line(refs: tuple[str, ...], out_dir: str, artifacts_dir: str | None, by: str,
                  measure: bool, studies: tuple[str, ...] = ()) -> str:
    """The command as a reader would retype it (not argv: that may be a venv path)."""
    words = ["labctl", "report", *refs, "-o", out_dir]
    for name in studies:
        words += ["--study", name]
    if by != "optimizer":
        words += ["--by", by]
    if artifacts_dir:
        words += ["--artifacts-dir", artifacts_dir]
    if measure:
        words.append("--bench")
    return shlex.join(words)

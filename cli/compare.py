"""``labctl compare``: runs side by side, from their artefact folders alone (no Redis)."""

from __future__ import annotations

import json
import shutil

import click

from labctl.cli.analysis.grouping import BadField
from labctl.cli.analysis.pipeline import NothingToCompare, analyse
from labctl.cli.analysis.robust import DEFAULT_TARGET
from labctl.cli.analysis.runs import RunNotFound
from labctl.cli.analysis.stats import describe_test
from labctl.cli.analysis.tables import comparison_rows, render_text
from labctl.cli.errors import BadSpec, LabctlError, NotFound
from labctl.cli.run import artifacts_dir_option
from labctl.shared.settings import get_settings


def load_analysis(refs: tuple[str, ...], artifacts_dir: str | None, by: str,
                  target: float = DEFAULT_TARGET):
    """The shared front half of compare and report, with CLI errors and exit codes."""
    root = artifacts_dir or get_settings().artifacts_dir
    try:
        analysis = analyse(list(refs), root, by, target)
    except RunNotFound as exc:
        raise NotFound(str(exc)) from None
    except BadField as exc:
        raise BadSpec(str(exc)) from None
    except NothingToCompare as exc:
        raise LabctlError(str(exc)) from None
    for note in analysis.notes:
        click.echo(f"labctl: skipped {note}", err=True)
    return analysis


@click.command("compare", short_help=(
    "Compare finished runs: accuracy, F1, speed, and a paired significance test."))
@click.argument("refs", nargs=-1, required=True, metavar="JOB|SWEEP|FOLDER...")
@artifacts_dir_option
@click.option("--by", default="optimizer", show_default=True,
              help="spec field whose values are compared; other differing fields split "
                   "the runs into separate setups")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="write overlaid loss/accuracy/F1 curves (mean ± std) to this image "
                   "(.png, .jpg, .pdf or .svg)")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_TARGET,
              show_default=True,
              help="test accuracy whose time to reach (epochs) is reported; a run that "
                   "misses it counts as never")
@click.option("--box", type=click.Path(dir_okay=False), default=None,
              help="write box plots across seeds of final test accuracy and epochs to "
                   "--target to this image")
@click.option("--json", "as_json", is_flag=True, help="print figures and tests as JSON")
def compare(refs: tuple[str, ...], artifacts_dir: str | None, by: str, output: str | None,
            target: float, box: str | None, as_json: bool) -> None:
    """Compare finished runs: final/best accuracy and F1, epochs to 95% of the best accuracy,
    time per epoch and throughput; mean ± std across seeds; and a paired significance test
    (runs matched by seed) of the difference between the compared groups. Then the median
    and bootstrap 95% interval of final test accuracy and of epochs to --target, their
    Wilcoxon tests, and Holm's correction when several setups (workloads) are compared.
    """
    analysis = load_analysis(refs, artifacts_dir, by, target)
    if output:
        from labctl.cli.analysis.plotting import plot_curves

        _write_figure(lambda: plot_curves(analysis.blocks, ["loss", "accuracy", "f1"], output),
                      output, "-o", "curves")
    if box:
        from labctl.cli.analysis.plotting import plot_boxes

        _write_figure(lambda: plot_boxes(analysis.blocks, target, box), box, "--box",
                      "box plots")
    if as_json:
        click.echo(json.dumps(analysis.to_json(), indent=2, default=str))
        return
    click.echo(render_text(*comparison_rows(analysis.blocks),
                           width=shutil.get_terminal_size().columns))
    for i, block in enumerate(analysis.blocks):
        tests = analysis.tests[i]
        if not tests:
            continue
        click.echo(f"\n{block.label}: significance across seeds (runs paired by seed)")
        for test in tests:
            head, *lines = describe_test(test)
            click.echo(f"  {head}")
            for line in lines:
                click.echo(f"    {line}")
    for line in robust_lines(analysis):
        click.echo(line)


def _write_figure(draw, path: str, flag: str, what: str) -> None:
    try:
        draw()
    except OSError as exc:
        raise BadSpec(f"cannot write {path}: {exc.strerror}") from None
    except ValueError as exc:  # an extension no image format has
        raise BadSpec(f"{flag} {exc}") from None
    click.echo(f"labctl: {what} written to {path}", err=True)


def robust_lines(analysis) -> list[str]:
    """Median [95% bootstrap CI] per group, then the Wilcoxon tests (Holm-corrected)."""
    from labctl.cli.analysis.robust import format_median

    lines = []
    for i, block in enumerate(analysis.blocks):
        robust = analysis.robust[i]
        lines.append(f"\n{block.label}: median [95% bootstrap CI] across seeds")
        width = max(len(label) for label in robust["groups"])
        for label, figures in robust["groups"].items():
            lines.append(f"  {label.ljust(width)}  final test accuracy "
                         f"{format_median(figures['final_accuracy'], 4)}; epochs to "
                         f"{analysis.target:g}: {format_median(figures['epochs_to_target'], 0)}"
                         f" ({figures['reached']}/{figures['runs']} reached)")
        for test in robust["tests"]:
            head, _, w_line, *holm = describe_test(test)
            lines.append(f"  {test.figure_label}, {test.b} - {test.a}: {w_line}"
                         + (f"; {holm[0]}" if holm else ""))
    return lines

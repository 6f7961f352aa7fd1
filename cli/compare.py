"""``labctl compare``: runs side by side, from their artefact folders alone (no Redis)."""

from __future__ import annotations

import json
import shutil

import click

from labctl.cli.analysis.grouping import BadField
from labctl.cli.analysis.pipeline import NothingToCompare, analyse
from labctl.cli.analysis.runs import RunNotFound
from labctl.cli.analysis.stats import describe_test
from labctl.cli.analysis.tables import comparison_rows, render_text
from labctl.cli.errors import BadSpec, LabctlError, NotFound
from labctl.cli.run import artifacts_dir_option
from labctl.shared.settings import get_settings


def load_analysis(refs: tuple[str, ...], artifacts_dir: str | None, by: str):
    """The shared front half of compare and report, with CLI errors and exit codes."""
    root = artifacts_dir or get_settings().artifacts_dir
    try:
        analysis = analyse(list(refs), root, by)
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
@click.option("--json", "as_json", is_flag=True, help="print figures and tests as JSON")
def compare(refs: tuple[str, ...], artifacts_dir: str | None, by: str, output: str | None,
            as_json: bool) -> None:
    """Compare finished runs: final/best accuracy and F1, epochs to 95% of the best accuracy,
    time per epoch and throughput; mean ± std across seeds; and a paired significance test
    (runs matched by seed) of the difference between the compared groups.
    """
    analysis = load_analysis(refs, artifacts_dir, by)
    if output:
        from labctl.cli.analysis.plotting import plot_curves

        try:
            plot_curves(analysis.blocks, ["loss", "accuracy", "f1"], output)
        except OSError as exc:
            raise BadSpec(f"cannot write {output}: {exc.strerror}") from None
        except ValueError as exc:  # an extension no image format has
            raise BadSpec(f"-o {exc}") from None
        click.echo(f"labctl: curves written to {output}", err=True)
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

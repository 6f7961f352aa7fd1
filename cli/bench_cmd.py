"""``labctl bench``: the lab's speed comparison, NumPy vs PyTorch, plus ResNet50 throughput.

The measuring is done by the benchmark modules (``labctl.bench.numpy_vs_torch``,
``labctl.bench.resnet_throughput``); this command runs them at one size, adds CUDA when present,
and prints one table with the speed ratios.
"""

from __future__ import annotations

import json

import click

from labctl.cli.errors import LabctlError


def measure(quick: bool):
    from labctl.cli.analysis.benchmarks import run_benchmarks

    try:
        return run_benchmarks(quick=quick)
    except ModuleNotFoundError as exc:
        if exc.name != "labctl.bench" and not str(exc.name).startswith("labctl.bench."):
            raise
        # An editable install made before bench/ existed does not map it.
        raise LabctlError("the benchmark package 'labctl.bench' is not importable; reinstall "
                          "labctl (pip install -e .) from the repository") from None


def measure_markdown(quick: bool = True) -> str:
    """The table as Markdown, for ``labctl report --bench``."""
    from labctl.cli.analysis.benchmarks import HEADER, table_rows
    from labctl.cli.analysis.environment import cpu_model, usable_cpus
    from labctl.cli.analysis.tables import render_markdown

    rows = measure(quick)
    return (render_markdown(HEADER, table_rows(rows))
            + f"\n\nMeasured {'(--quick) ' if quick else ''}on {cpu_model()}, "
            f"{usable_cpus()} usable cores. Speed ratio: how many times the baseline's "
            "speed (>1 is faster). On a shared machine the `1 thread (CPU time)` rows are the "
            "fairer comparison: they count only the measuring thread's own CPU time, which "
            "other processes barely disturb, whereas multi-threaded torch suffers most when "
            "its threads wait on busy cores.")


@click.command("bench", short_help=(
    "Time the NumPy CNN against PyTorch, and our ResNet50 against torchvision's."))
@click.option("--quick", is_flag=True,
              help="fewer, smaller timing rounds: seconds instead of minutes, noisier")
@click.option("--json", "as_json", is_flag=True, help="print the rows as JSON")
def bench(quick: bool, as_json: bool) -> None:
    """Time one training step of the NumPy CNN and the same network in PyTorch (CPU, and
    CUDA when present), and of our ResNet50 against torchvision's; print a table of
    ms/step, images/s and speed ratios.
    """
    from labctl.cli.analysis.benchmarks import HEADER, table_rows
    from labctl.cli.analysis.environment import environment
    from labctl.cli.analysis.tables import render_text

    env = environment()
    click.echo(f"labctl: benchmarking on {env['cpu']} ({env['cpus']} cores), "
               f"{env['device']}{' (--quick)' if quick else ''} ...", err=True)
    rows = measure(quick)
    if as_json:
        click.echo(json.dumps({"quick": quick, "environment": env,
                               "rows": [r.as_dict() for r in rows]}, indent=2))
        return
    click.echo(render_text(HEADER, table_rows(rows)))
    click.echo("speed ratio: times the baseline's speed (>1 is faster); CNN rows against "
               "the NumPy CNN, ResNet50 rows against torchvision", err=True)

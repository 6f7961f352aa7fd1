"""``labctl``: the entry point. Each command lives in its own module, listed in ``COMMANDS``
and imported only when it runs, so ``labctl --help`` and the read commands start without
numpy, torch or matplotlib (Click's lazy-subcommand pattern)."""

from __future__ import annotations

import importlib
import sys

import click

from labctl.cli.errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_USAGE
from labctl.shared.settings import SettingsError

#: name -> (module, attribute, the one-line help ``labctl --help`` shows), in --help order.
#: A test checks each line against the command's own help, so the two cannot drift.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("labctl.cli.run", "run",
            "Train a job in this process and print its summary."),
    "validate": ("labctl.cli.spec_cmd", "validate",
                 "Check a YAML or JSON spec file."),
    "spec": ("labctl.cli.spec_cmd", "spec_group",
             "Inspect the job spec."),
    "sweep": ("labctl.cli.sweep", "sweep",
              "Submit a grid of jobs: the product of the comma lists given, times the seeds."),
    "tune": ("labctl.cli.tune", "tune",
             "Tune each optimizer with the same Optuna budget; every trial is a labctl job."),
    "compare": ("labctl.cli.compare", "compare",
                "Compare finished runs: accuracy, F1, speed, and a paired significance test."),
    "report": ("labctl.cli.report", "report",
               "Write a Markdown report: curves, tables, conclusion, speed and set-up."),
    "predict": ("labctl.cli.predict", "predict",
                "Classify images with a finished job's final weights: top-k classes and "
                "probabilities."),
    "bench": ("labctl.cli.bench_cmd", "bench",
              "Time the NumPy CNN against PyTorch, and our ResNet50 against torchvision's."),
    "submit": ("labctl.cli.submit", "submit",
               "Queue a training job for the workers and print its id on the first line."),
    "status": ("labctl.cli.status", "status",
               "Show a job's state, progress, latest metrics and error."),
    "list": ("labctl.cli.list_cmd", "list_jobs",
             "List queued and past jobs, newest first."),
    "logs": ("labctl.cli.logs", "logs",
             "Print a job's log: one line per epoch, plus starts, resumes and the outcome."),
    "cancel": ("labctl.cli.cancel", "cancel",
               "Cancel a job."),
    "worker": ("labctl.cli.worker_cmd", "worker",
               "Run a worker in the foreground until Ctrl-C / SIGTERM."),
}

EPILOG = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())


class LazyGroup(click.Group):
    """A group whose commands are imported when they are run (or asked for their --help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])


@click.group(cls=LazyGroup, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="labctl")
def cli() -> None:
    """labctl: train deep-learning experiments through a job queue."""


def main() -> None:
    # Not Click's standalone mode: its Ctrl-C handling prints "Aborted!" and exits 1.
    try:
        code = cli.main(prog_name="labctl", standalone_mode=False)
    except click.UsageError as exc:  # one line, like every other error (Click prints three)
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"labctl: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SettingsError as exc:  # raised wherever a command first reads its settings
        click.echo(f"labctl: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except (KeyboardInterrupt, click.Abort):
        click.echo("\nlabctl: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)  # ctx.exit(n) returns n here


if __name__ == "__main__":
    main()

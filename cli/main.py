"""``labctl``: the entry point. Each command lives in its own module and is registered here."""

from __future__ import annotations

import importlib
import sys

import click

from labctl.cli.errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_USAGE
from labctl.shared.settings import SettingsError

# (module, attribute) of every top-level command, in --help order.
COMMANDS = [
    ("labctl.cli.run", "run"),
    ("labctl.cli.spec_cmd", "validate"),
    ("labctl.cli.spec_cmd", "spec_group"),
    ("labctl.cli.sweep", "sweep"),
    ("labctl.cli.compare", "compare"),
    ("labctl.cli.report", "report"),
    ("labctl.cli.bench_cmd", "bench"),
    ("labctl.cli.submit", "submit"),
    ("labctl.cli.status", "status"),
    ("labctl.cli.list_cmd", "list_jobs"),
    ("labctl.cli.logs", "logs"),
    ("labctl.cli.cancel", "cancel"),
    ("labctl.cli.worker_cmd", "worker"),
]

EPILOG = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="labctl")
def cli() -> None:
    """labctl: train deep-learning experiments through a job queue."""


for module_name, attr in COMMANDS:
    cli.add_command(getattr(importlib.import_module(module_name), attr))


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

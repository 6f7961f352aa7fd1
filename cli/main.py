"""``labctl``: the entry point. Each command lives in its own module and is registered here."""

from __future__ import annotations

import importlib

import click

from cli.errors import EXIT_CODES

# (module, attribute) of every top-level command, in --help order.
COMMANDS = [
    ("cli.run", "run"),
    ("cli.spec_cmd", "validate"),
    ("cli.spec_cmd", "spec_group"),
    ("cli.sweep", "sweep"),
    ("cli.compare", "compare"),
    ("cli.report", "report"),
    ("cli.bench_cmd", "bench"),
    ("cli.submit", "submit"),
    ("cli.status", "status"),
    ("cli.list_cmd", "list_jobs"),
    ("cli.logs", "logs"),
    ("cli.cancel", "cancel"),
    ("cli.worker_cmd", "worker"),
]

EPILOG = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="labctl")
def cli() -> None:
    """labctl: train deep-learning experiments through a job queue."""


for module_name, attr in COMMANDS:
    cli.add_command(getattr(importlib.import_module(module_name), attr))


def main() -> None:
    cli(prog_name="labctl")


if __name__ == "__main__":
    main()

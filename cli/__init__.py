"""The ``labctl`` command line: one Click command per module, registered in ``cli.main``."""

import sys


def main() -> None:
    """The console script. Importing the commands (click, pydantic, numpy) takes a moment;
    a Ctrl-C during it exits 130 in one line like everywhere else, not with a traceback."""
    try:
        from labctl.cli.main import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("\nlabctl: interrupted\n")
        sys.exit(130)  # cli.errors.EXIT_INTERRUPTED, not imported: it may be what was cut off
    run_cli()

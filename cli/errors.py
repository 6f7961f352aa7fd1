"""Exit codes and the exceptions that produce them.

Every failure a user can cause ends in one clear line on stderr and a documented code,
never a traceback. The table is in the README.
"""

from __future__ import annotations

import click

EXIT_OK = 0
EXIT_JOB_FAILED = 1       # a job failed or was cancelled; nothing finished to compare or
                          # predict with (no final weights)
EXIT_USAGE = 2            # bad spec, bad flag, bad file or image (Click's own usage code)
EXIT_NOT_FOUND = 3        # no such job or sweep
EXIT_BUSY = 4             # the job is held by a worker or another process
EXIT_UNAVAILABLE = 69     # broker / Redis unreachable (sysexits EX_UNAVAILABLE)
EXIT_CANT_WRITE = 73      # a worker's artefacts directory is unwritable or full (EX_CANTCREAT)
EXIT_INTERRUPTED = 130    # Ctrl-C (or SIGTERM to `labctl run`)

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_JOB_FAILED: "the job failed or was cancelled (or no finished run to compare, no "
                     "final weights to predict with)",
    EXIT_USAGE: "bad spec, option or file (a damaged job file, an image predict cannot read)",
    EXIT_NOT_FOUND: "no such job or sweep",
    EXIT_BUSY: "the job is queued or running elsewhere (a worker, another local run), or "
               "not finished yet for predict",
    EXIT_UNAVAILABLE: "Redis (the broker) is unreachable",
    EXIT_CANT_WRITE: "a worker's artefacts directory is unwritable or full",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C, or SIGTERM to run)",
}


class LabctlError(click.ClickException):
    exit_code = EXIT_JOB_FAILED

    def show(self, file=None) -> None:
        click.echo(f"labctl: {self.format_message()}", err=True)


class BadSpec(LabctlError):
    exit_code = EXIT_USAGE


class DamagedJobFile(BadSpec):
    """A job's own file (status.json, its checkpoint) that cannot be read: exit 2, a bad
    file, with the file named and what to do about it."""


class NotFound(LabctlError):
    exit_code = EXIT_NOT_FOUND


class JobBusy(LabctlError):
    exit_code = EXIT_BUSY


class BrokerUnavailable(LabctlError):
    exit_code = EXIT_UNAVAILABLE


class StoreUnwritable(LabctlError):
    exit_code = EXIT_CANT_WRITE


class JobFailed(LabctlError):
    exit_code = EXIT_JOB_FAILED

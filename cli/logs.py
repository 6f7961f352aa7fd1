"""``labctl logs JOB [--follow]``: the job's epoch lines, read from Redis (no shared volume)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import click

from labctl.cli.broker import broker_errors, checked_job_id, find_job
from labctl.cli.errors import BrokerUnavailable
from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.records import JobRecords

#: How often --follow / --wait ask Redis; a few cheap reads a second.
POLL_SECONDS = 0.25
#: How long --follow / --wait ride over Redis being unreachable before exiting 69.
FOLLOW_OUTAGE_SECONDS = 30.0


def follow_log(records: JobRecords, job_id: str, emit: Callable[[str], None], *,
               start: int = 0, follow: bool = True) -> str | None:
    """Emit the job's log lines from ``start``; with ``follow``, keep emitting new ones until
    the job ends. Returns the job's last state seen."""
    seen = start
    outage_started: float | None = None
    while True:
        try:
            with broker_errors():
                state = records.state(job_id)  # read before the lines: none is missed at the end
                lines = records.read_log(job_id, seen)
        except BrokerUnavailable:
            # A Redis restart takes seconds and the job trains on through it (its lease
            # outlives the outage): a follower should too, not exit 69 mid-job.
            outage_started = outage_started or time.monotonic()
            if not follow or time.monotonic() - outage_started > FOLLOW_OUTAGE_SECONDS:
                raise
            time.sleep(1.0)
            continue
        outage_started = None
        for line in lines:
            emit(line)
        seen += len(lines)
        if not follow or state is None or state in TERMINAL_STATES:
            return state
        time.sleep(POLL_SECONDS)


@click.command("logs")
@click.argument("job_id", metavar="JOB")
@click.option("--follow", "-f", is_flag=True, help="keep printing new lines until the job ends")
@click.option("--json", "as_json", is_flag=True,
              help='print {"id", "state", "lines"} as JSON (with --follow: once it ends)')
def logs(job_id: str, follow: bool, as_json: bool) -> None:
    """Print a job's log: one line per epoch, plus starts, resumes and the outcome."""
    job_id = checked_job_id(job_id)
    records, folder = find_job(job_id)
    lines: list[str] = []
    emit = lines.append if as_json else click.echo
    if folder is not None:
        # A job run with `labctl run` has no record; its folder is read instead.
        state = folder.read_status().get("state")
        for line in folder.read_log():
            emit(line)
    else:
        # Ctrl-C, the usual way to leave --follow, exits 130 at the entry point (cli.main).
        state = follow_log(records, job_id, emit, follow=follow)
    if as_json:
        click.echo(json.dumps({"id": job_id, "state": state, "lines": lines}, indent=2))

"""``labctl cancel JOB``: a queued job never starts; a running one stops at its next batch."""

from __future__ import annotations

import click

from labctl.cli.broker import broker_errors, checked_job_id, open_records
from labctl.cli.errors import NotFound
from labctl.shared import lifecycle
from labctl.shared.jobstate import JobState


@click.command("cancel")
@click.argument("job_id", metavar="JOB")
def cancel(job_id: str) -> None:
    """Cancel a job. Its artefacts (checkpoint, metrics so far) are kept."""
    job_id = checked_job_id(job_id)
    records = open_records()
    with broker_errors():
        found = lifecycle.cancel(records, job_id)
    if found == "missing":
        raise NotFound(f"no job {job_id}")
    if found == JobState.QUEUED:
        click.echo(f"cancelled job {job_id}; it will not start", err=True)
    elif found == JobState.RUNNING:
        click.echo(f"cancelling job {job_id}: it stops after its current batch "
                   f"(labctl status {job_id})", err=True)
    else:
        click.echo(f"job {job_id} already {found}; nothing to cancel", err=True)

"""``labctl cancel JOB``: a queued job never starts; a running one stops at its next batch."""

from __future__ import annotations

import click

from labctl.cli.broker import broker_errors, checked_job_id, open_records_unless_local
from labctl.cli.errors import JobBusy, NotFound
from labctl.cli.folder_view import ABANDONED, damaged_folder, folder_record
from labctl.shared import folder_lock, lifecycle
from labctl.shared.artifacts import ArtifactStore
from labctl.shared.folder_lock import LOCAL_RUN
from labctl.shared.jobstate import JobState
from labctl.shared.settings import get_settings


@click.command("cancel")
@click.argument("job_id", metavar="JOB")
def cancel(job_id: str) -> None:
    """Cancel a job. Its artefacts (checkpoint, metrics so far) are kept."""
    job_id = checked_job_id(job_id)
    records = open_records_unless_local(job_id)
    found, epoch = "missing", 0
    if records is not None:
        with broker_errors():
            found = lifecycle.cancel(records, job_id,
                                     ArtifactStore(get_settings().artifacts_dir))
            epoch = ((records.get(job_id) or {}).get("epoch") or 0) if found != "missing" else 0
    if found == "missing":
        explain_folder_job(job_id)
        return
    kept = f" after {epoch} epochs (its checkpoint is kept)" if epoch else ""
    if found == JobState.QUEUED:
        click.echo(f"cancelled job {job_id}{kept}; it will not start"
                   f"{' again' if epoch else ''}", err=True)
    elif found == "lost":
        click.echo(f"cancelled job {job_id}{kept}: its worker had stopped (resume it with "
                   f"labctl run --resume {job_id})", err=True)
    elif found == JobState.RUNNING:
        click.echo(f"cancelling job {job_id}: it stops after its current batch "
                   f"(labctl status {job_id})", err=True)
    else:
        click.echo(f"job {job_id} already {found}; nothing to cancel", err=True)


def explain_folder_job(job_id: str) -> None:
    """A job with no record is not the queue's to cancel: say what its folder shows."""
    folder = ArtifactStore(get_settings().artifacts_dir).job(job_id)
    try:
        record = folder_record(folder) if folder.exists() else None
    except (ValueError, OSError) as exc:
        raise damaged_folder(folder, exc) from None
    if record is None:
        raise NotFound(f"no job {job_id}")
    if (holder := folder_lock.holder(folder.path)) is not None:
        if holder.startswith(LOCAL_RUN):
            raise JobBusy(f"job {job_id} runs locally{holder.removeprefix(LOCAL_RUN)}: stop "
                          "it there with Ctrl-C (the queue cannot cancel it)")
        raise JobBusy(f"job {job_id} is being run by {holder} but Redis has no record of "
                      "it yet; try again in a few seconds")
    elif record["state"] == ABANDONED:
        click.echo(f"job {job_id} was a local run that stopped without ending (abandoned); "
                   f"nothing to cancel (resume it with labctl run --resume {job_id})",
                   err=True)
    else:
        click.echo(f"job {job_id} already {record['state']}; nothing to cancel", err=True)

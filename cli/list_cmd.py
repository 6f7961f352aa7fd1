"""``labctl list``: the newest jobs, one line each."""

from __future__ import annotations

import json
from typing import Any

import click

from labctl.cli.broker import broker_errors, open_records
from labctl.cli.errors import BrokerUnavailable
from labctl.cli.folder_view import ABANDONED, FROM_FOLDER, folder_records
from labctl.cli.style import state_text
from labctl.shared.artifacts import ArtifactStore
from labctl.shared.jobstate import STATES
from labctl.shared.records import INDEX_KEY
from labctl.shared.settings import get_settings

HEADER = ["ID", "STATE", "QUEUE", "PRIORITY", "MODEL/OPT", "DATASET", "EPOCH", "ACC", "WORKER"]


def table_row(job: dict[str, Any]) -> list[str]:
    acc = (job.get("metrics") or {}).get("test_accuracy")
    priority = job.get("priority") or (job.get("spec") or {}).get("priority") or "normal"
    return [job.get("id") or "?", job.get("state") or "?", job.get("queue") or "-", priority,
            f"{job.get('model') or '?'}/{job.get('optimizer') or '?'}",
            job.get("dataset") or "-", f"{job.get('epoch') or 0}/{job.get('epochs') or '?'}",
            f"{acc:.4f}" if isinstance(acc, int | float) else "-", job.get("worker") or "-"]


def list_with_folders(state: str | None, limit: int) -> tuple[list[dict[str, Any]], str]:
    """The newest jobs from Redis and from the job folders on this host that Redis has no
    record of (``labctl run`` jobs, records Redis lost), and a note saying how many came
    from folders. Redis unreachable: the folders alone, if there are any."""
    store = ArtifactStore(get_settings().artifacts_dir)
    try:
        records = open_records()
    except BrokerUnavailable as exc:
        jobs = folder_records(store, state=state)[:limit]
        if not jobs:
            raise
        return jobs, f"labctl: {exc.format_message()}; showing the job folders only"
    with broker_errors():
        jobs = records.list(state=state, limit=limit)
        known = set(records.client.zrange(INDEX_KEY, 0, -1))
    local = folder_records(store, skip=known, state=state)
    # Newest first, by when each job was created (a folder knows when it started); the
    # sort is stable, so Redis' own order stands between records created together.
    merged = sorted(jobs + local, key=lambda job: job.get("created_at")
                    or job.get("started_at") or "", reverse=True)[:limit]
    shown = sum(1 for job in merged if job.get("source") == FROM_FOLDER)
    note = (f"{shown} job(s) read from their folders in {store.root} (Redis has no record "
            "of them)" if shown else "")
    return merged, note


@click.command("list")
@click.option("--state", type=click.Choice([state.value for state in STATES] + [ABANDONED]),
              default=None,
              help="only jobs in this state")
@click.option("--limit", "-n", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="at most this many jobs, newest first")
@click.option("--json", "as_json", is_flag=True, help="print the records as a JSON list")
def list_jobs(state: str | None, limit: int, as_json: bool) -> None:
    """List queued and past jobs, newest first."""
    jobs, from_folders = list_with_folders(state, limit)
    if from_folders:
        click.echo(from_folders, err=True)
    if as_json:
        click.echo(json.dumps(jobs, indent=2, sort_keys=True))
        return
    if not jobs:
        click.echo("no jobs" + (f" in state {state}" if state else ""), err=True)
        return
    rows = [HEADER] + [table_row(job) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        if index:  # padded first: the colour codes take no room on the screen
            cells[1] = state_text(row[1], cells[1])
        click.echo("  ".join(cells).rstrip())

"""``labctl list``: the newest jobs, one line each."""

from __future__ import annotations

import json
from typing import Any

import click

from labctl.cli.broker import broker_errors, open_records
from labctl.shared.jobstate import STATES

HEADER = ["ID", "STATE", "QUEUE", "MODEL/OPT", "DATASET", "EPOCH", "ACC", "WORKER"]


def table_row(job: dict[str, Any]) -> list[str]:
    acc = (job.get("metrics") or {}).get("test_accuracy")
    return [job.get("id") or "?", job.get("state") or "?", job.get("queue") or "-",
            f"{job.get('model') or '?'}/{job.get('optimizer') or '?'}",
            job.get("dataset") or "-", f"{job.get('epoch') or 0}/{job.get('epochs') or '?'}",
            f"{acc:.4f}" if isinstance(acc, int | float) else "-", job.get("worker") or "-"]


@click.command("list")
@click.option("--state", type=click.Choice([state.value for state in STATES]), default=None,
              help="only jobs in this state")
@click.option("--limit", "-n", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="at most this many jobs, newest first")
@click.option("--json", "as_json", is_flag=True, help="print the records as a JSON list")
def list_jobs(state: str | None, limit: int, as_json: bool) -> None:
    """List queued and past jobs, newest first."""
    records = open_records()
    with broker_errors():
        jobs = records.list(state=state, limit=limit)
    if as_json:
        click.echo(json.dumps(jobs, indent=2, sort_keys=True))
        return
    if not jobs:
        click.echo("no jobs" + (f" in state {state}" if state else ""), err=True)
        return
    rows = [HEADER] + [table_row(job) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                      strict=True)).rstrip())

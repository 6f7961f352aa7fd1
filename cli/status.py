"""``labctl status JOB``: where a job stands, from its Redis record."""

from __future__ import annotations

import json
from typing import Any

import click

from labctl.cli.broker import broker_errors, checked_job_id, find_job
from labctl.cli.errors import NotFound
from labctl.cli.folder_view import FROM_FOLDER, damaged_folder, folder_record
from labctl.cli.style import state_text
from labctl.shared.jobstate import JobState

#: Always present in --json output, even before the worker filled them in.
REQUIRED_KEYS = ("id", "state", "epoch", "epochs", "metrics", "error", "artifacts")


def load_status(job_id: str) -> dict[str, Any]:
    """The job's record; for a job Redis has no record of (a ``labctl run`` job, or a
    record Redis lost), what its folder says, with ``source: folder``."""
    records, folder = find_job(job_id)
    if records is not None:
        with broker_errors():
            record = records.get(job_id)
    else:
        try:
            record = folder_record(folder)
        except (ValueError, OSError) as exc:  # torn or edited by hand, as compare reports it
            raise damaged_folder(folder, exc) from None
    if not record:
        raise NotFound(f"no job {job_id}")
    for key in REQUIRED_KEYS:
        record.setdefault(key, None)
    return record


def describe(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for humans."""
    rows = [("id", record["id"]), ("state", record["state"])]
    what = " / ".join(str(record[k]) for k in ("model", "optimizer") if record.get(k))
    if record.get("dataset"):
        what += f" on {record['dataset']}"
    if what:
        rows.append(("job", what))
    for key in ("name", "sweep_id", "queue", "worker", "attempts"):
        if record.get(key) not in (None, "", []):
            rows.append((key, str(record[key])))
    rows.append(("epoch", f"{record.get('epoch') or 0}/{record.get('epochs') or '?'}"))
    metrics = record.get("metrics") or {}
    if metrics:
        shown = [f"{name}={metrics[name]:.4f}" for name in
                 ("train_loss", "test_loss", "test_accuracy", "test_f1_macro")
                 if isinstance(metrics.get(name), int | float)]
        rows.append(("metrics", " ".join(shown)))
    stamps = ["created_at", "started_at", "heartbeat_at", "finished_at"]
    if (record.get("attempts") or 1) > 1:
        stamps.insert(2, "attempt_started_at")  # when the latest attempt began
    for key in stamps:
        if record.get(key):
            rows.append((key.removesuffix("_at").replace("_", " "), record[key]))
    if record.get("cancel_requested") and record["state"] == JobState.RUNNING:
        rows.append(("cancel", "requested; stops after the current batch"))
    if record.get("error"):
        rows.append(("error", record["error"]))
    if record.get("artifacts"):
        rows.append(("artifacts", record["artifacts"]))
    if record.get("source") == FROM_FOLDER:
        rows.append(("source", "its job folder (Redis has no record of this job)"))
    return rows


@click.command("status")
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="print the whole record as JSON")
def status(job_id: str, as_json: bool) -> None:
    """Show a job's state, progress, latest metrics and error."""
    record = load_status(checked_job_id(job_id))
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    rows = describe(record)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        shown = state_text(value) if label == "state" else value
        click.echo(f"{label:<{width}}  {shown}")

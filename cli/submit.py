"""``labctl submit``: queue a job and print its id; optionally wait for it, following its log."""

from __future__ import annotations

import json
import sys

import click

from labctl.cli.broker import get_record, open_records, submit_or_exit
from labctl.cli.errors import EXIT_INTERRUPTED, JobFailed
from labctl.cli.logs import follow_log
from labctl.cli.spec_options import spec_options, to_spec


@click.command("submit")
@spec_options
@click.option("--wait", is_flag=True, help="block until the job ends; exit 1 unless it succeeded")
@click.option("--follow", is_flag=True, help="like --wait, printing epoch lines as they come")
@click.option("--json", "as_json", is_flag=True, help="print the job record as JSON")
def submit(spec_values: dict, wait: bool, follow: bool, as_json: bool) -> None:
    """Queue a training job for the workers and print its id on the first line.

    Every option has a default: `labctl submit --opt adamax` queues the flagship run
    (ResNet50 on Stanford Cars). numpy-cnn jobs go to the cpu queue, resnet50 jobs to the gpu
    queue unless --device cpu.
    """
    spec = to_spec(spec_values)  # an unset data_root is resolved by the worker
    records = open_records()
    job_id = submit_or_exit(spec, records)
    record = get_record(records, job_id)
    if not as_json:
        click.echo(job_id)
    click.echo(f"queued job {job_id} on the {record['queue']} queue: {spec.model} / "
               f"{spec.optimizer} on {spec.dataset}, {spec.epochs} epochs", err=True)
    if not (wait or follow):
        if as_json:
            click.echo(json.dumps(record, indent=2, sort_keys=True))
        return

    shown: list[str] = []

    def show(line: str) -> None:
        if follow:  # progress, so stderr: stdout stays the job id
            click.echo(line, err=True)
            shown.append(line)

    try:
        state = follow_log(records, job_id, show, queue=record["queue"],
                           notice=lambda line: click.echo(f"labctl: {line}", err=True))
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; job {job_id} goes on (stop it with: labctl cancel "
                   f"{job_id})", err=True)
        sys.exit(EXIT_INTERRUPTED)
    record = get_record(records, job_id)
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
    if state != "succeeded":
        error = record.get("error")
        # The log's last line already said why ("failed: <error>"): say it once.
        told = bool(error) and any(str(error) in line for line in shown[-3:])
        raise JobFailed(f"job {job_id} {state}" + ("" if told else f": {error}"))
    final = (record.get("summary") or {}).get("final") or {}
    acc = f": test accuracy {final['test_accuracy']:.4f}" if "test_accuracy" in final else ""
    click.echo(f"job {job_id} succeeded{acc}; artifacts in {record.get('artifacts')}", err=True)

"""``labctl logs JOB [--follow]``: the job's epoch lines, read from Redis (no shared volume)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import click

from labctl.cli.broker import broker_errors, checked_job_id, find_job
from labctl.cli.errors import BrokerUnavailable, NotFound
from labctl.cli.folder_view import damaged_folder, run_state
from labctl.shared.jobstate import TERMINAL_STATES, JobState
from labctl.shared.records import JobRecords

#: How often --follow / --wait ask Redis; a few cheap reads a second.
POLL_SECONDS = 0.25
#: How long a job waits in its queue before --follow / --wait check that a worker takes it.
NO_WORKER_SECONDS = 5.0
#: How long --follow / --wait ride over Redis being unreachable before exiting 69.
FOLLOW_OUTAGE_SECONDS = 30.0


def follow_log(records: JobRecords, job_id: str, emit: Callable[[str], None], *,
               start: int = 0, follow: bool = True, queue: str | None = None,
               notice: Callable[[str], None] | None = None) -> str | None:
    """Emit the job's log lines from ``start``; with ``follow``, keep emitting new ones until
    the job ends. Returns the job's last state seen.

    With ``queue`` and ``notice``: a job still queued after :data:`NO_WORKER_SECONDS` while
    no live worker takes jobs from ``queue`` gets one ``notice`` saying so (and the wait
    goes on: a worker may yet start).

    A record that vanishes (Redis restarted without persistence) is waited for: the worker
    that runs the job writes it back from the job folder within a heartbeat or two, and
    the follower then goes on from the restored log's end. If it does not come back,
    :class:`RecordVanished`."""
    seen = start
    outage_started: float | None = None
    vanished_at: float | None = None
    began, checked_workers = time.monotonic(), queue is None or notice is None
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
        if state is None and follow:  # the caller found the record: it has vanished
            vanished_at = vanished_at or time.monotonic()
            if time.monotonic() - vanished_at > FOLLOW_OUTAGE_SECONDS:
                raise RecordVanished(f"job {job_id}: Redis no longer has its record (was it "
                                     "restarted without persistence?) and no worker has "
                                     f"restored it; its folder may say more: labctl status "
                                     f"{job_id}")
            time.sleep(POLL_SECONDS)
            continue
        if (not checked_workers and state == JobState.QUEUED
                and time.monotonic() - began > NO_WORKER_SECONDS):
            checked_workers = True
            with broker_errors():
                listening = [w for w in records.live_workers() if queue in w.get("queues", ())]
            if not listening:
                notice(f"no worker is taking jobs from the {queue} queue; start one with: "
                       f"labctl worker -Q {queue} (still waiting)")
        if vanished_at is not None:  # restored: its log starts over from the folder's
            vanished_at = None
            emit("(the job's record was restored from its folder; the log goes on)")
            with broker_errors():
                seen = len(records.read_log(job_id))
            continue
        for line in lines:
            emit(line)
        seen += len(lines)
        if not follow or state is None or state in TERMINAL_STATES:
            return state
        time.sleep(POLL_SECONDS)


class RecordVanished(NotFound):
    """The record of a followed job disappeared from Redis and did not come back."""


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
        try:
            state = run_state(folder, folder.read_status().get("state"))
        except (ValueError, OSError) as exc:
            # The log is still worth showing; the state is unknown, and said once.
            state = None
            click.echo(f"labctl: {damaged_folder(folder, exc).format_message()}", err=True)
        for line in folder.read_log():
            emit(line)
    else:
        # Ctrl-C, the usual way to leave --follow, exits 130 at the entry point (cli.main).
        state = follow_log(records, job_id, emit, follow=follow)
    if as_json:
        click.echo(json.dumps({"id": job_id, "state": state, "lines": lines}, indent=2))

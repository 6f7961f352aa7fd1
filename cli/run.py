"""``labctl run``: train a job in this process, no Redis or Docker needed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from labctl.cli.broker import broker_errors, open_records
from labctl.cli.errors import (
    EXIT_INTERRUPTED,
    BadSpec,
    BrokerUnavailable,
    JobBusy,
    JobFailed,
    NotFound,
)
from labctl.cli.foreground import run_in_foreground
from labctl.cli.spec_options import spec_options, to_spec
from labctl.shared.artifacts import (
    ArtifactStore,
    InvalidJobId,
    JobFolder,
    mkstemp_like_open,
    new_job_id,
)
from labctl.shared.jobstate import JobState, is_terminal
from labctl.shared.settings import get_settings
from labctl.shared.spec import JobSpec, SpecError, check_runtime, resolve_data_root
from labctl.worker.checkpoints import (
    WEIGHTS_NAMES,
    CheckpointDamaged,
    checked_epoch,
    checkpoint_path,
    peek_epoch,
)
from labctl.worker.runner import KeyboardInterruptWithOutcome


def artifacts_dir_option(fn):
    return click.option(
        "--artifacts-dir", type=click.Path(file_okay=False), default=None,
        help="where job folders go [$LABCTL_ARTIFACTS_DIR or ./artifacts]")(fn)


def checked_for_this_host(spec: JobSpec) -> JobSpec:
    """Resolve data_root and run the host checks before any job folder exists, so a typo in
    --data-root exits 2 and leaves no debris."""
    spec = resolve_data_root(spec, get_settings().data_dir)
    try:
        check_runtime(spec)
        if spec.model == "numpy-cnn":
            from labctl.worker.numpy_cnn.parallel import num_threads

            num_threads()  # LABCTL_NUMPY_THREADS, read where the job runs: this process
    except (SpecError, ValueError) as exc:
        raise BadSpec(str(exc)) from None
    return spec


#: What ``--resume`` may change: how long and where the job runs, never what it trains (a
#: different model, optimizer or data would not fit the checkpoint, or silently mix runs).
RESUME_OVERRIDES = ("epochs", "device", "devices", "num_workers", "data_root", "compile", "name",
                    "tags", "priority")


def resumed_spec(folder: JobFolder, stored: JobSpec, overrides: dict) -> JobSpec:
    """The stored spec with the allowed overrides, checked before anything is written."""
    spec = to_spec({**stored.model_dump(mode="json"), **overrides})
    changed = [name for name in JobSpec.model_fields
               if getattr(spec, name) != getattr(stored, name) and name not in RESUME_OVERRIDES]
    if changed:
        raise BadSpec(f"{changed[0]}: cannot be changed when resuming (only "
                      f"{', '.join(RESUME_OVERRIDES)} can); start a new job instead")
    try:
        done = folder.read_status().get("epoch") or 0
    except (ValueError, OSError) as exc:
        raise BadSpec(f"cannot read {folder.status_path}: {exc}") from None
    if spec.epochs < done:
        raise BadSpec(f"epochs: job {folder.job_id} has already trained {done} epochs; "
                      f"resume with --epochs {done} or more")
    return spec


def check_resume_point(folder: JobFolder, stored: JobSpec, spec: JobSpec) -> None:
    """What the resume would start from, checked before anything is written: a damaged
    checkpoint exits 2 with the line the run would fail with, and so does a succeeded job
    whose checkpoint was dropped when it finished (it cannot train further)."""
    path = checkpoint_path(folder.path, spec.model)
    if not path.exists():
        if folder.read_status().get("state") == JobState.SUCCEEDED:
            weights = folder.path / WEIGHTS_NAMES[spec.model]
            start_from = (f"; a new job can start from them with --init-weights {weights}"
                          if spec.model == "resnet50" else "")
            raise BadSpec(f"job {folder.job_id} succeeded and its checkpoint was removed "
                          f"when it finished (LABCTL_KEEP_CHECKPOINT=1 keeps it), so it "
                          f"cannot train further; its final weights are {weights}"
                          f"{start_from}")
        return  # the run says it starts from epoch 1
    try:
        # Against the stored spec's epochs: past them the file is damaged; past the
        # requested ones only, the request is too short.
        epoch = checked_epoch(path, peek_epoch(path, spec.model), stored.epochs)
    except CheckpointDamaged as exc:
        raise BadSpec(f"job {folder.job_id}: {exc}") from None
    if spec.epochs < epoch:
        raise BadSpec(f"epochs: job {folder.job_id} has already trained {epoch} epochs; "
                      f"resume with --epochs {epoch} or more")


def refuse_if_queue_holds(folder: JobFolder) -> None:
    """A job the queue still holds (queued, or running on a worker) is not resumed here:
    two writers in one folder would train the same epochs twice. Exit 4, naming the worker.
    Without Redis, a folder last written by a worker is refused unless it recorded an end."""
    job_id = folder.job_id
    try:
        records = open_records()
        with broker_errors():
            record = records.get(job_id)
    except (BrokerUnavailable, BadSpec):
        try:
            status = folder.read_status()
        except (ValueError, OSError):
            status = {}
        if status.get("worker") and not is_terminal(status.get("state")):
            raise JobBusy(f"job {job_id} was last run by worker {status['worker']} and Redis "
                          f"cannot be reached to check that it is free; try again when "
                          f"it can") from None
        return
    if record is None or is_terminal(record.get("state")):
        return
    if record["state"] == JobState.RUNNING:
        raise JobBusy(f"job {job_id} is running on worker {record.get('worker')}; cancel it "
                      f"first (labctl cancel {job_id})")
    raise JobBusy(f"job {job_id} is queued for a worker; cancel it first "
                  f"(labctl cancel {job_id})")


def writable_store(root: str) -> ArtifactStore:
    """The artefact store, or exit 2 naming the directory: it is the user's setting
    (--artifacts-dir or LABCTL_ARTIFACTS_DIR)."""
    path = Path(root)
    problem = None
    if path.exists() and not path.is_dir():
        problem = "not a directory"
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
            # Creating a file is the only test that holds for root, read-only mounts and
            # pseudo file systems alike (os.access says yes to root on /proc).
            os.unlink(mkstemp_like_open(path, prefix=".labctl-probe-"))
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem:
        raise BadSpec(f"artifacts directory {root}: {problem}")
    return ArtifactStore(path)


@click.command("run")
@spec_options
@artifacts_dir_option
@click.option("--resume", "resume_id", default=None, metavar="JOB",
              help="continue JOB from its last checkpoint, with its stored spec")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def run(spec_values: dict, artifacts_dir: str | None, resume_id: str | None,
        as_json: bool) -> None:
    """Train a job in this process and print its summary.

    Ctrl-C stops cleanly: the last checkpoint is kept and the job is marked cancelled;
    `labctl run --resume JOB` continues it.
    """
    root = artifacts_dir or get_settings().artifacts_dir
    store = ArtifactStore(root)
    if resume_id is not None:  # even "": an empty id is a mistake, not "no resume"
        try:
            folder = store.job(resume_id)
        except InvalidJobId as exc:
            raise BadSpec(str(exc)) from None
        try:
            stored = folder.read_spec()
        except (ValueError, OSError) as exc:
            raise BadSpec(f"cannot read {folder.spec_path}: {exc}") from None
        if stored is None:
            raise NotFound(f"no job {resume_id} under {store.root}")
        spec = resumed_spec(folder, to_spec(stored), spec_values)
        refuse_if_queue_holds(folder)
        check_resume_point(folder, to_spec(stored), spec)
        job_id = resume_id
    else:
        spec = to_spec(spec_values)
        job_id = new_job_id()
    spec = checked_for_this_host(spec)
    store = writable_store(root)  # after the spec checks: a bad spec leaves no directory
    try:
        outcome = run_in_foreground(spec, job_id, store)
    except KeyboardInterruptWithOutcome:
        folder = store.job(job_id)
        done = folder.read_status().get("epoch") or 0
        kept = (f"checkpoint after epoch {done} kept in {folder.path}" if done
                else f"no epoch had finished; {folder.path} holds the spec")
        click.echo(f"\ncancelled; {kept} (resume with: labctl run --resume {job_id})",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    folder = store.job(job_id)
    if outcome.failure == "busy":  # nothing was written: the folder is another run's
        raise JobBusy(f"job {job_id}: {outcome.error}; stop it there first")
    if outcome.failure == "input":  # missing data, like any bad spec, is the user's to fix
        raise BadSpec(f"job {job_id} failed: {outcome.error}")
    if outcome.state != "succeeded":
        raise JobFailed(f"job {job_id} {outcome.state}: {outcome.error}")
    if as_json:
        click.echo(json.dumps({**outcome.summary, "artifacts": str(folder.path)}, indent=2))
        return
    final = outcome.summary["final"]
    click.echo(f"job {job_id} succeeded: test accuracy {final['test_accuracy']:.4f}, "
               f"macro-F1 {final['test_f1_macro']:.4f} after {spec.epochs} epochs "
               f"({outcome.summary['total_seconds']:.1f}s)")
    click.echo(f"artifacts: {folder.path}")

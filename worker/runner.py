"""The one way a job is executed: ``labctl run`` calls it in-process, the Celery task calls
it in a worker. It owns the job folder: spec, status, metrics, checkpoints, plots, summary.

    seed -> load data -> build engine -> resume? (checkpoint checked, rows and log
    lines past it dropped) -> for each epoch:
        train_one_epoch -> evaluate -> metrics.jsonl -> checkpoint (atomic) -> log.txt
        -> status.json -> reporter
    -> final weights, confusion matrix, plots, summary.json -> status.json (the end)
    -> the checkpoint deleted if it succeeded (unless LABCTL_KEEP_CHECKPOINT)
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from labctl.shared import folder_lock, lifecycle
from labctl.shared.artifacts import ArtifactStore, JobFolder, atomic_path, utc_now, write_json
from labctl.shared.folder_lock import FolderBusy
from labctl.shared.jobstate import EpochRow, JobState, Summary
from labctl.shared.settings import get_settings
from labctl.shared.spec import JobSpec, SpecError, check_runtime, resolve_data_root
from labctl.worker.checkpoints import checked_epoch, checkpoint_path
from labctl.worker.engine import (
    DataError,
    Engine,
    JobCancelled,
    RankLost,
    TrainingDiverged,
    check_not_diverged,
    seed_global_generators,
)
from labctl.worker.evaluation import accuracy, confusion_matrix, f1_macro, per_class_accuracy

log = logging.getLogger(__name__)



class Reporter:
    """Progress hooks. Subclasses print (CLI), update Redis (worker) or export metrics."""

    def on_start(self, job_id: str, spec: JobSpec, info: dict[str, Any]) -> None: ...

    def on_batch(self, epoch: int, batch: int, num_batches: int) -> None:
        """Called after each batch; may raise :class:`JobCancelled`."""

    def before_save(self, epoch: int) -> None:
        """Called just before an epoch's results (or the final artefacts) are written to the
        job folder; may raise to keep a worker that lost the job from writing over the
        attempt that now owns it."""

    def on_epoch(self, row: EpochRow) -> None: ...

    def on_end(self, state: JobState, result: dict[str, Any]) -> None:
        """``result``: ``{"error": str | None, "summary": Summary}`` (empty unless it
        succeeded)."""

    def close(self) -> None:
        """The job left this process without ending (handed back to the queue)."""


class ReporterWrapper(Reporter):
    """A reporter that hands every hook to :meth:`_dispatch`: the one place that lists the
    hooks for reporters that wrap others."""

    def _dispatch(self, hook: str, *args: Any) -> None:
        raise NotImplementedError

    def on_start(self, job_id, spec, info):
        self._dispatch("on_start", job_id, spec, info)

    def on_batch(self, epoch, batch, num_batches):
        self._dispatch("on_batch", epoch, batch, num_batches)

    def before_save(self, epoch):
        self._dispatch("before_save", epoch)

    def on_epoch(self, row):
        self._dispatch("on_epoch", row)

    def on_end(self, state, result):
        self._dispatch("on_end", state, result)

    def close(self):
        self._dispatch("close")


class Reporters(ReporterWrapper):
    """Fan one event out to several reporters, in order."""

    def __init__(self, *reporters: Reporter | None):
        self.reporters = [r for r in reporters if r is not None]

    def _dispatch(self, hook: str, *args: Any) -> None:
        for reporter in self.reporters:
            getattr(reporter, hook)(*args)


@dataclass
class RunOutcome:
    job_id: str
    state: JobState                 # an end: succeeded | failed | cancelled
    error: str | None = None
    summary: Summary = field(default_factory=dict)  # type: ignore[arg-type]
    #: why it did not succeed: "input" (bad spec or data: the user's to fix), "diverged",
    #: "crash", "cancelled", "busy" (another process is writing its folder); None on success
    failure: str | None = None


def build_engine(spec: JobSpec) -> Engine:
    # Imported here: a numpy-cnn job should not pay for importing torch's engine, and the
    # Celery parent process must not touch CUDA before forking.
    if spec.model == "numpy-cnn":
        from labctl.worker.numpy_engine import NumpyEngine

        return NumpyEngine(spec)
    if spec.devices > 1:
        from labctl.worker.ddp_launcher import DistributedEngine

        return DistributedEngine(spec)
    from labctl.worker.torch_engine import TorchEngine

    return TorchEngine(spec)


#: An epoch's line as :func:`epoch_line` writes it, with its epoch as group 1.
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ ")


def epoch_line(row: EpochRow, epochs: int) -> str:
    """The human-readable line for one epoch, shared by ``labctl run`` and ``labctl logs``."""
    return (f"epoch {row['epoch']}/{epochs} train_loss={row['train_loss']:.4f} "
            f"test_loss={row['test_loss']:.4f} acc={row['test_accuracy']:.4f} "
            f"f1={row['test_f1_macro']:.4f} {row['epoch_seconds']:.1f}s "
            f"{row['images_per_second']:.0f} img/s")


def resume_line(start_epoch: int) -> str:
    """What a resumed run says first, in the job's log: where it goes on from."""
    if start_epoch:
        return f"resumed from checkpoint after epoch {start_epoch}"
    return "no checkpoint to resume from; starting from epoch 1"


def outcome_line(state: str, error: str | None, summary: Summary | None) -> str:
    """The job's last log line, so `labctl logs` ends by saying how it ended."""
    final = (summary or {}).get("final") or {}
    if state == JobState.SUCCEEDED and "test_accuracy" in final:
        return (f"succeeded: test accuracy {final['test_accuracy']:.4f}, macro-F1 "
                f"{final.get('test_f1_macro', float('nan')):.4f} "
                f"({(summary or {}).get('total_seconds', 0):.1f}s)")
    return f"{state}: {error}" if error else state


def run_job(spec: JobSpec, job_id: str, store: ArtifactStore, reporter: Reporter | None = None,
            *, default_data_root: str | None = None, allowed_data_dir: str | None = None,
            status_extra: dict[str, Any] | None = None, writer: str = folder_lock.LOCAL_RUN,
            keep_checkpoint: bool | None = None,
            on_rank_lost: Callable[[RankLost], None] | None = None) -> RunOutcome:
    """Run ``spec`` to the end, resuming from the job's checkpoint if one exists.

    A job that succeeds keeps its final weights and drops its resumable checkpoint (the
    larger file: 283 MB beside 94 MB of weights for a ResNet50), unless ``keep_checkpoint``
    (default: the ``LABCTL_KEEP_CHECKPOINT`` setting) says to keep it.

    The run holds the job folder's lock (``shared/folder_lock.py``) while it writes; a
    folder another process on this host is writing is left untouched and the outcome says
    who has it (``failure="busy"``). ``writer`` is how this run names itself there.

    Never raises for a failed job: the outcome (and status.json) says why. Only
    ``KeyboardInterrupt`` is turned into ``cancelled`` and then re-raised, so Ctrl-C still
    reaches the caller once the job folder is consistent.

    ``on_rank_lost``: called when a rank of a data-parallel job was killed (a worker raises
    its hand-back there, leaving the folder as it is); without it the job fails, resumable.
    """
    reporter = reporter or Reporter()
    spec = resolve_data_root(spec, default_data_root)
    folder = store.job(job_id)
    try:
        folder.create()
        if keep_checkpoint is None:
            keep_checkpoint = get_settings().keep_checkpoint
        with folder_lock.hold(folder.path, writer):
            return _run_holding_lock(spec, folder, reporter, allowed_data_dir, status_extra,
                                     keep_checkpoint, on_rank_lost)
    except FolderBusy as busy:
        error = f"its folder is being written by {busy.holder}"
        failure = "busy"
    except OSError as exc:  # an unwritable store: no folder to record it in
        error, failure = f"cannot write the job folder {folder.path}: {exc}", "crash"
    # The reporter (the queue's record) is the only witness: the folder is not ours to write.
    reporter.on_end(JobState.FAILED, {"error": error, "summary": {}})
    return RunOutcome(job_id, JobState.FAILED, error, {}, failure=failure)


def _run_holding_lock(spec: JobSpec, folder: JobFolder, reporter: Reporter,
                      allowed_data_dir: str | None, status_extra: dict[str, Any] | None,
                      keep_checkpoint: bool,
                      on_rank_lost: Callable[[RankLost], None] | None) -> RunOutcome:
    job_id = folder.job_id
    try:
        status = lifecycle.run_started(folder, spec, status_extra)
    except (OSError, ValueError) as exc:  # unwritable store, or a corrupt status.json
        error = f"cannot write the job folder {folder.path}: {exc}"
        reporter.on_end(JobState.FAILED, {"error": error, "summary": {}})
        return RunOutcome(job_id, JobState.FAILED, error, {}, failure="crash")
    clock = RunClock(status.get("run_seconds") or 0.0)
    resuming = bool(status.get("state"))  # an earlier run (or attempt) wrote this folder
    try:
        summary = _train(spec, folder, reporter, allowed_data_dir, clock, resuming)
    except KeyboardInterrupt:
        outcome = _finish(folder, reporter, JobState.CANCELLED, "interrupted by the user",
                          failure="cancelled", clock=clock)
        raise KeyboardInterruptWithOutcome(outcome) from None
    except JobCancelled:
        return _finish(folder, reporter, JobState.CANCELLED, "cancelled by the user",
                       failure="cancelled", clock=clock)
    except (SpecError, DataError) as exc:
        return _finish(folder, reporter, JobState.FAILED, one_line(exc), failure="input",
                       clock=clock)
    except TrainingDiverged as exc:
        return _finish(folder, reporter, JobState.FAILED, str(exc), failure="diverged", clock=clock)
    except RankLost as exc:
        if on_rank_lost is not None:
            folder.log(f"{exc}; the job stops and goes back to the queue")
            on_rank_lost(exc)
        return _finish(folder, reporter, JobState.FAILED, f"{exc} (labctl run --resume "
                       "continues from the last checkpoint)", failure="crash", clock=clock)
    except Exception as exc:  # the job fails; the worker lives on to take the next one
        log.exception("job %s crashed", job_id)
        _keep_traceback(folder)
        return _finish(folder, reporter, JobState.FAILED, _describe_crash(exc, spec),
                       failure="crash", clock=clock)
    return _finish(folder, reporter, JobState.SUCCEEDED, None, summary, clock=clock,
                   drop_on_success=None if keep_checkpoint else
                   checkpoint_path(folder.path, spec.model))


class RunClock:
    """Seconds a job has run, over all its attempts: each attempt starts from what the
    folder's status.json recorded, so a resumed job's ``total_seconds`` is the whole run
    (an attempt's time after its last checkpoint is lost with the worker that ran it)."""

    def __init__(self, before: float = 0.0):
        self.before = float(before)
        self._started = time.monotonic()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self._started


class KeyboardInterruptWithOutcome(KeyboardInterrupt):
    def __init__(self, outcome: RunOutcome):
        super().__init__()
        self.outcome = outcome


#: The last line of a traceback: "package.module.ErrorName: message".
_TRACEBACK_LAST_LINE = re.compile(r"^[A-Za-z_][\w.]*: (?P<message>.*)$")


def one_line(exc: BaseException) -> str:
    """An exception's message as one line. An error raised in a DataLoader worker process
    reaches us re-raised by torch, its message a whole traceback ("Caught DataError in
    DataLoader worker process 0. Original Traceback ..."); its cause is the last line."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1].strip()
        match = _TRACEBACK_LAST_LINE.match(last)
        text = match["message"] if match else last
    return (text.splitlines() or [type(exc).__name__])[0][:500]


def _describe_crash(exc: Exception, spec: JobSpec) -> str:
    text = f"{type(exc).__name__}: {one_line(exc)}"
    if "out of memory" in text.lower():
        return (f"out of memory with batch_size={spec.batch_size}; "
                f"try a smaller batch, e.g. --batch-size {max(1, spec.batch_size // 2)}")
    return text


def _keep_traceback(folder: JobFolder) -> None:
    """The crash's traceback, for whoever debugs it, in traceback.txt: log.txt keeps one
    line per failure (its outcome), and a full disk must not add a second failure here."""
    try:
        with atomic_path(folder.traceback_path) as tmp:
            tmp.write_text(traceback.format_exc())
    except OSError:
        pass


def _finish(folder: JobFolder, reporter: Reporter, state: JobState, error: str | None,
            summary: Summary | None = None, failure: str | None = None,
            *, clock: RunClock, drop_on_success: Path | None = None) -> RunOutcome:
    """Record the end in the folder and tell the reporter. ``drop_on_success``: the
    checkpoint to delete once the folder says succeeded (from then on nothing resumes
    from it: a requeued attempt finds the end recorded and does not train)."""
    reporter.before_save(0)  # the end is a write too: a stale attempt must not make it
    try:
        lifecycle.run_ended(folder, state, error, run_seconds=clock.seconds())
        folder.log(outcome_line(state, error, summary))
    except (OSError, ValueError) as exc:  # a full disk, a status.json damaged meanwhile:
        # the reporter (the queue's record) still hears of the end.
        log.error("job %s ended %s but its folder could not record it: %s",
                  folder.job_id, state, exc)
    else:
        if state == JobState.SUCCEEDED and drop_on_success is not None:
            try:
                drop_on_success.unlink(missing_ok=True)
            except OSError as exc:  # the job succeeded all the same; only disk is lost
                log.warning("job %s: its checkpoint could not be deleted: %s",
                            folder.job_id, exc)
    result = {"error": error, "summary": summary or {}}
    try:
        reporter.on_end(state, result)
    except Exception:  # a broken reporter must not change the job's outcome
        log.exception("reporter failed at the end of job %s", folder.job_id)
    return RunOutcome(folder.job_id, state, error, summary or {}, failure)


def _train(spec: JobSpec, folder: JobFolder, reporter: Reporter,
           allowed_data_dir: str | None, clock: RunClock, resuming: bool) -> Summary:
    check_runtime(spec, allowed_data_dir)
    seed_global_generators(spec.seed)
    engine = build_engine(spec)
    try:
        return _train_engine(spec, folder, reporter, clock, resuming, engine)
    finally:
        close = getattr(engine, "close", None)  # a data-parallel engine's rank processes
        if close is not None:
            close()


def _train_engine(spec: JobSpec, folder: JobFolder, reporter: Reporter, clock: RunClock,
                  resuming: bool, engine: Engine) -> Summary:
    checkpoint = folder.path / engine.checkpoint_name
    start_epoch = 0
    if checkpoint.exists():
        # Checked before any row is dropped: an edited epoch of -5 would drop them all.
        start_epoch = checked_epoch(checkpoint, engine.load_checkpoint(checkpoint),
                                    spec.epochs)
    folder.keep_metrics_through(start_epoch)  # rows of epochs the checkpoint does not hold
    # A resumed job's earlier rows, for a reporter whose copy of them may be missing one.
    rows = folder.read_metrics() if start_epoch else []
    if resuming or start_epoch:
        _mend_log(folder, start_epoch, rows, spec.epochs)
        folder.log(resume_line(start_epoch))
    info = {"num_classes": engine.num_classes, "train_size": engine.train_size,
            "test_size": engine.test_size, "start_epoch": start_epoch}
    lifecycle.run_progress(folder, **info)
    reporter.on_start(folder.job_id, spec, {**info, "finished_rows": rows, "resumed": resuming})

    for epoch in range(start_epoch + 1, spec.epochs + 1):
        lr = engine.current_lr()
        trained = engine.train_one_epoch(
            epoch, lambda b, n, e=epoch: reporter.on_batch(e, b, n))
        check_not_diverged(trained.loss, engine.num_classes, epoch)
        evaluated = engine.evaluate()
        cm = confusion_matrix(evaluated.y_true, evaluated.y_pred, engine.num_classes)
        row: EpochRow = {
            "epoch": epoch,
            "train_loss": trained.loss,
            "test_loss": evaluated.loss,
            "test_accuracy": accuracy(evaluated.y_true, evaluated.y_pred),
            "test_f1_macro": f1_macro(cm),
            "epoch_seconds": trained.seconds,
            "images_per_second": trained.images / max(trained.seconds, 1e-9),
            "lr": lr,
        }
        if evaluated.top5 is not None:
            row["test_top5_accuracy"] = evaluated.top5
        row.update(evaluated.extra)
        # Each write is fenced on its own: a worker frozen between two of them (SIGSTOP, a
        # swap storm) must not resume writing into a folder another attempt now owns.
        fence = partial(reporter.before_save, epoch)
        # The row before the checkpoint: a crash in between resumes from epoch - 1, re-runs
        # this epoch, and the resume truncation drops the orphan row, so each epoch appears
        # exactly once (the other order would lose this epoch's row for good).
        fence()
        folder.append_metrics(row)
        fence()
        engine.save_checkpoint(checkpoint, epoch, spec.model_dump(mode="json"))
        # The log line after the checkpoint: a crash before it leaves a gap that the
        # resume fills from metrics.jsonl (see _mend_log), never a line the resume repeats.
        folder.log(epoch_line(row, spec.epochs))
        fence()
        lifecycle.run_progress(folder, epoch=epoch, metrics=row, run_seconds=clock.seconds())
        reporter.on_epoch(row)

    return _write_final_artefacts(spec, folder, engine, clock,
                                  partial(reporter.before_save, spec.epochs))


def _mend_log(folder: JobFolder, start_epoch: int, rows: list[EpochRow], epochs: int) -> None:
    """On resume: log.txt keeps one line per epoch the checkpoint holds and none past it,
    as metrics.jsonl does. An older run's line for an epoch about to be trained again goes
    (so no epoch is logged twice); an epoch whose line was never written (killed between
    the checkpoint and the line) gets it from its metrics row. Other lines stay."""
    lines = folder.read_log()
    kept: list[str] = []
    logged: set[int] = set()
    for line in lines:
        match = EPOCH_LINE.match(line)
        if match:
            epoch = int(match[1])
            if epoch > start_epoch or epoch in logged:
                continue
            logged.add(epoch)
        kept.append(line)
    for row in rows:
        if row["epoch"] not in logged:
            try:
                kept.append(epoch_line(row, epochs))
            except (KeyError, TypeError, ValueError):  # a hand-edited row: leave the gap
                continue
    if kept != lines:
        folder.replace_log(kept)


def _write_final_artefacts(spec: JobSpec, folder: JobFolder, engine: Engine,
                           clock: RunClock, fence: Callable[[], None]) -> Summary:
    from labctl.worker import plots  # matplotlib import is slow; only finished jobs need it

    fence()
    engine.save_weights(folder.path / engine.weights_name)
    evaluated = engine.evaluate()
    cm = confusion_matrix(evaluated.y_true, evaluated.y_pred, engine.num_classes)
    fence()
    np.save(folder.path / "confusion_matrix.npy", cm)
    rows = folder.read_metrics()
    plots.write_job_plots(folder.plots_dir, rows, cm, engine.class_names)
    final = rows[-1] if rows else {}
    best = max(rows, key=lambda r: r["test_accuracy"]) if rows else {}
    summary: Summary = {
        "job_id": folder.job_id,
        "model": spec.model,
        "optimizer": spec.optimizer,
        "dataset": spec.dataset,
        "num_classes": engine.num_classes,
        "train_size": engine.train_size,
        "test_size": engine.test_size,
        # With a validation split the test_* figures are the validation split's.
        "evaluated_on": spec.evaluation_split,
        "epochs": spec.epochs,
        # Ranks of the last attempt; images_per_second is summed over them.
        "devices": spec.devices,
        "final": {k: v for k, v in final.items() if k.startswith("test_")},
        # One epoch's numbers (the most accurate one), not maxima taken from different epochs.
        "best": {"epoch": best.get("epoch"), "test_accuracy": best.get("test_accuracy"),
                 "test_f1_macro": best.get("test_f1_macro")},
        "per_class_accuracy": dict(zip(engine.class_names, per_class_accuracy(cm), strict=True)),
        # In label order (summary.json sorts its keys): what `labctl predict` names outputs by.
        "class_names": list(engine.class_names),
        "mean_epoch_seconds": float(np.mean([r["epoch_seconds"] for r in rows])) if rows else None,
        "mean_images_per_second": (float(np.mean([r["images_per_second"] for r in rows]))
                                   if rows else None),
        "total_seconds": clock.seconds(),
        "finished_at": utc_now(),
    }
    fence()
    write_json(folder.summary_path, summary)
    return summary

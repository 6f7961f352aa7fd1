"""What a job can be, and which store says so: the vocabulary every module shares.

A job's state lives in two stores, each authoritative for its own fields:

=====================  ===========================================  ======================
store                  authoritative for                            state changed only by
=====================  ===========================================  ======================
Redis record           the queue's view: state, attempts, owner and  ``shared.lifecycle``
(``labctl:job:<id>``)  lease, worker, timestamps, cancel request,    (through the Lua
                       the epoch log, the end as the queue saw it    scripts of
                                                                    ``shared.records``)
job folder             what was trained: rows (``metrics.jsonl``),  ``shared.lifecycle``
(``status.json``,      checkpoint, final artefacts, and the end as  (status.json); the
``summary.json`` ...)  the training run saw it                       runner writes the rest
=====================  ===========================================  ======================

When they disagree about how a job ended, the folder wins if it recorded an end (it was
written by the run itself, just before its record); otherwise the record's end is mirrored
into the folder. The states and the record's and folder's shapes are defined here, once.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypedDict


class JobState(StrEnum):
    """queued -> running -> succeeded | failed | cancelled; running -> queued when a job is
    handed back (graceful shutdown) or requeued (its worker died)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Every state, in lifecycle order (``labctl list --state`` offers them in this order).
STATES: tuple[JobState, ...] = tuple(JobState)
#: The states a job never leaves.
TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


def is_terminal(state: object) -> bool:
    """True for a terminal state given as a ``JobState`` or its string (as read from JSON)."""
    return state in TERMINAL_STATES


class EpochRow(TypedDict, total=False):
    """One line of ``metrics.jsonl``: one finished epoch."""

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    test_f1_macro: float
    test_top5_accuracy: float  # only with more than 5 classes
    epoch_seconds: float
    images_per_second: float
    lr: float


class Summary(TypedDict, total=False):
    """``summary.json``, written once when a job succeeds (and copied into its record)."""

    job_id: str
    model: str
    optimizer: str
    dataset: str
    num_classes: int
    train_size: int
    test_size: int  # the size of the split evaluated: see evaluated_on
    evaluated_on: str  # "test", or "validation" when the spec carves one (spec.validation)
    epochs: int
    devices: int  # data-parallel ranks of the last attempt (absent in older summaries: 1)
    final: dict[str, float]  # the last epoch's test_* figures
    best: dict[str, Any]  # one epoch's numbers: epoch, test_accuracy, test_f1_macro
    per_class_accuracy: dict[str, float]
    class_names: list[str]  # index = the model's output; absent before labctl predict
    mean_epoch_seconds: float | None
    mean_images_per_second: float | None  # summed over the devices
    total_seconds: float  # over every attempt
    finished_at: str


class JobRecord(TypedDict, total=False):
    """The Redis record of a queued job, as ``JobRecords.get`` returns it."""

    id: str
    state: str
    queue: str
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    epoch: int
    epochs: int
    metrics: dict[str, Any] | None  # the latest epoch row, then the summary
    error: str | None
    worker: str | None
    artifacts: str | None
    cancel_requested: bool
    model: str
    optimizer: str
    dataset: str
    name: str | None
    tags: list[str]
    sweep_id: str | None
    priority: str  # high | normal | low
    spec: dict[str, Any]

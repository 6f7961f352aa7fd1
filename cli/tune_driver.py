"""The loop of ``labctl tune``: each trial becomes an ordinary labctl job, and the job's
result becomes the trial's value.

A trial is counted once, when its job ends: the driver that submitted it, or one that finds
it unfinished later (``Driver.adopt``, after a crash or on another host), tells Optuna its
value. Trials run here one after another (``LocalJobs``) or through the queue
(``QueuedJobs``), where several at once spread over the workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from labctl.cli.tune_space import SEARCH_SPACE, score, spec_values
from labctl.cli.tune_storage import StudySettings
from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.jobstate import JobState, is_terminal
from labctl.shared.spec import JobSpec

#: How often the queued driver looks at its trials' records.
POLL_SECONDS = 0.5


class TrialJobs(Protocol):
    """Where trial jobs run: in this process (``--local``) or through the queue."""

    #: True when ``start`` returns only once the job has ended (it ran here)
    blocking: bool

    def start(self, spec: JobSpec, job_id: str) -> None: ...

    def state(self, job_id: str) -> str | None:
        """The job's state, None when neither Redis nor its folder knows it."""

    def error(self, job_id: str) -> str | None: ...


@dataclass
class TrialResult:
    optimizer: str
    trial_number: int
    job_id: str
    state: str
    value: float | None        # None: the trial failed and is not counted
    error: str | None = None


class TrialFailed(RuntimeError):
    """A trial job failed for a reason other than its hyperparameters (bad data, a crash)."""


@dataclass
class Driver:
    """Keeps ``trials`` trials per optimizer finished, at most ``parallel`` in flight."""

    studies: dict[str, optuna.Study]
    settings: StudySettings
    jobs: TrialJobs
    store: ArtifactStore
    trials: int
    parallel: int = 1
    on_result: Callable[[TrialResult], None] = lambda result: None
    on_start: Callable[[str, int, str, dict[str, float]], None] = lambda *a: None
    pending: dict[str, tuple[str, int]] = field(default_factory=dict)  # job id -> (opt, trial)

    def run(self) -> None:
        self.adopt()
        while True:
            self._launch()
            if not self.pending:
                return
            self._collect()

    def adopt(self) -> None:
        """Trials left running by an earlier driver: told now if their job has ended,
        waited for if it is still queued or running, failed if no job was ever sent."""
        for opt, study in self.studies.items():
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                job_id = trial.user_attrs.get("job_id")
                state = self.jobs.state(job_id) if job_id else None
                if state is not None and is_terminal(state):
                    self._finish(opt, trial.number, job_id)
                elif state is None or self.jobs.blocking:
                    # No job, or a local one whose process is gone (this driver is the
                    # only one running local trials): nothing will ever end it.
                    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                else:
                    self.pending[job_id] = (opt, trial.number)

    def counted(self, opt: str) -> int:
        """Finished trials plus those running anywhere: the budget already spent."""
        return len(self.studies[opt].get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))

    def _launch(self) -> None:
        # Round robin, one trial per optimizer at a time: neither optimizer's trials wait
        # behind the other's, locally or on the queue.
        launched = True
        while launched and len(self.pending) < self.parallel:
            launched = False
            for opt in self.settings.optimizers:
                if len(self.pending) >= self.parallel or self.counted(opt) >= self.trials:
                    continue
                self._launch_one(opt)
                launched = True
                if self.jobs.blocking:
                    self._collect()  # it has already ended

    def _launch_one(self, opt: str) -> None:
        from labctl.cli.spec_options import to_spec

        study = self.studies[opt]
        trial = study.ask()
        params = {r.name: trial.suggest_float(r.name, r.low, r.high, log=r.log)
                  for r in SEARCH_SPACE}
        spec = to_spec({**self.settings.base, "optimizer": opt, **spec_values(params),
                        "tags": ["tune", f"study={self.settings.study}",
                                 f"trial={trial.number}"]})
        job_id = new_job_id()
        trial.set_user_attr("job_id", job_id)
        self.pending[job_id] = (opt, trial.number)
        self.on_start(opt, trial.number, job_id, params)
        try:
            self.jobs.start(spec, job_id)
        except KeyboardInterrupt:  # Ctrl-C in a local trial: it does not count
            del self.pending[job_id]
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            raise

    def _collect(self) -> None:
        """Wait for one pending job to end and tell its trial."""
        while True:
            for job_id, (opt, number) in list(self.pending.items()):
                state = self.jobs.state(job_id)
                if state is not None and is_terminal(state):
                    del self.pending[job_id]
                    self._finish(opt, number, job_id)
                    return
            time.sleep(POLL_SECONDS)

    def _finish(self, opt: str, number: int, job_id: str) -> None:
        study = self.studies[opt]
        state = self.jobs.state(job_id) or JobState.FAILED
        error = self.jobs.error(job_id)
        rows = self.store.job(job_id).read_metrics()
        diverged = state == JobState.FAILED and (error or "").startswith("diverged")
        if state == JobState.SUCCEEDED or diverged:
            # A rate that diverges is a result of the search, not a broken trial: it scores
            # what it reached before diverging, within the same budget.
            if state == JobState.SUCCEEDED and not rows:
                raise TrialFailed(f"trial job {job_id} succeeded but its metrics are not "
                                  f"under {self.store.root}: labctl tune reads them from "
                                  "the artefacts folder the workers write")
            value = score(rows, self.settings.objective, self.settings.target)
            study.tell(number, value, skip_if_finished=True)
            self.on_result(TrialResult(opt, number, job_id, state, value, error))
            return
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        self.on_result(TrialResult(opt, number, job_id, state, None, error))
        raise TrialFailed(f"trial {number} ({opt}) job {job_id} {state}: {error}")


class LocalJobs:
    """Trial jobs run here, one after another, with progress on stderr."""

    blocking = True

    def __init__(self, store: ArtifactStore):
        self.store = store

    def start(self, spec: JobSpec, job_id: str) -> None:
        from labctl.cli.foreground import run_in_foreground

        run_in_foreground(spec, job_id, self.store)

    def state(self, job_id: str) -> str | None:
        folder = self.store.job(job_id)
        return folder.read_status().get("state") if folder.exists() else None

    def error(self, job_id: str) -> str | None:
        return self.store.job(job_id).read_status().get("error")


class QueuedJobs:
    """Trial jobs through the queue; their records say when they end."""

    blocking = False

    def __init__(self, store: ArtifactStore, records: Any):
        self.store, self.records = store, records

    def start(self, spec: JobSpec, job_id: str) -> None:
        from labctl.cli.broker import submit_or_exit

        submit_or_exit(spec, self.records, job_id=job_id)

    def state(self, job_id: str) -> str | None:
        from labctl.cli.broker import broker_errors

        with broker_errors():
            state = self.records.state(job_id)
        if state is None:  # a Redis that forgot the job: its folder still knows
            return LocalJobs(self.store).state(job_id)
        return state

    def error(self, job_id: str) -> str | None:
        from labctl.cli.broker import broker_errors

        with broker_errors():
            record = self.records.get(job_id)
        return (record or {}).get("error") or self.store.job(job_id).read_status().get("error")



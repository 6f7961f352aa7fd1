"""Optuna studies of ``labctl tune``: where they are stored, and the loop that turns each
trial into an ordinary labctl job and its result back into the trial's value.

One labctl study is one Optuna study per optimizer, named ``<study>.<optimizer>``, all with
the same settings (base spec, objective, target, sampler seed) kept in its user attributes.
The studies live in Optuna's journal storage: a file under the artefacts root for
``--local``, Redis (``LABCTL_REDIS_URL``) otherwise, so every ``labctl tune`` pointed at
that Redis, on any host, shares them; the trial jobs run on whichever workers take them.
A trial is counted once, when its job ends: the driver that submitted it, or one that
finds it unfinished later (``adopt``), tells Optuna its value.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from labctl.cli.tune_space import OBJECTIVES, SEARCH_SPACE, score, space_as_json, spec_values
from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.jobstate import JobState, is_terminal
from labctl.shared.spec import JobSpec

#: Key prefix of the studies' journal in Redis, apart from the job records.
REDIS_PREFIX = "labctl:optuna"
#: The local journal, under the artefacts root.
LOCAL_JOURNAL = Path("studies") / "optuna-journal.log"
#: How often the queued driver looks at its trials' records.
POLL_SECONDS = 0.5
#: Settings a resumed study must match (the rest, like --trials, may change).
SETTING_KEYS = ("base", "objective", "target", "sampler_seed", "validation")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_storage(*, local: bool, artifacts_root: str | Path, redis_url: str
                 ) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if local:
            path = Path(artifacts_root) / LOCAL_JOURNAL
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path))
        else:
            backend = _tls_aware(JournalRedisBackend)(redis_url, prefix=REDIS_PREFIX)
        return optuna.storages.JournalStorage(backend)


def _redis_client(url: str):
    import redis

    from labctl.shared.redis_tls import redis_target

    # Bytes, not text: the journal's snapshot is a pickle.
    target = redis_target(url)
    return redis.Redis.from_url(target.url, **target.client_options())


def _tls_aware(backend_class):
    """Optuna's Redis journal on a client with labctl's TLS options: a ``rediss://`` URL
    alone does not carry LABCTL_REDIS_TLS_CA/_CERT/_KEY, which the job records use."""

    class LabctlRedisBackend(backend_class):
        def __init__(self, url: str, prefix: str) -> None:
            super().__init__(url, prefix=prefix)
            self._redis = _redis_client(url)

        def __setstate__(self, state: dict[str, Any]) -> None:
            super().__setstate__(state)
            self._redis = _redis_client(self._url)

    return LabctlRedisBackend


def optuna_name(study: str, optimizer: str) -> str:
    return f"{study}.{optimizer}"


class SettingsMismatch(ValueError):
    """A resumed study asked for with settings other than those it was made with."""


@dataclass
class StudySettings:
    study: str
    optimizers: list[str]
    base: dict[str, Any]        # spec values every trial shares (validation included)
    objective: str
    target: float
    sampler_seed: int
    validation: float

    def attrs(self) -> dict[str, Any]:
        return {"labctl_study": self.study, "objective": self.objective,
                "target": self.target, "sampler_seed": self.sampler_seed,
                "validation": self.validation, "base": self.base,
                "search_space": space_as_json()}


def sampler(seed: int) -> optuna.samplers.TPESampler:
    # constant_liar: trials still running count as bad guesses, so several asked at once
    # (queued) spread out instead of landing on one point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def open_studies(storage: optuna.storages.BaseStorage, settings: StudySettings
                 ) -> dict[str, optuna.Study]:
    """One Optuna study per optimizer, made now or resumed; raises SettingsMismatch."""
    studies = {}
    for opt in settings.optimizers:
        direction = OBJECTIVES[settings.objective]
        study = optuna.create_study(storage=storage, study_name=optuna_name(settings.study, opt),
                                    direction=direction, sampler=sampler(settings.sampler_seed),
                                    load_if_exists=True)
        existing = study.user_attrs
        if existing:
            _check_same(settings, existing)
        else:
            for key, value in {**settings.attrs(), "optimizer": opt}.items():
                study.set_user_attr(key, value)
        studies[opt] = study
    return studies


def _check_same(settings: StudySettings, existing: dict[str, Any]) -> None:
    wanted = settings.attrs()
    # The base spec's fields one by one, so the message names the field that differs.
    pairs = [(f"{k}", existing.get("base", {}).get(k), v) for k, v in wanted["base"].items()]
    pairs += [(k, existing.get(k), wanted[k]) for k in SETTING_KEYS if k != "base"]
    for key, had, asked in pairs:
        if had != asked:
            raise SettingsMismatch(
                f"study {settings.study} was made with {key}={had!r}, not {asked!r}; "
                "resume it with its own settings or name a new --study")


def stored_settings(storage: optuna.storages.BaseStorage, study: str) -> dict[str, Any] | None:
    """The settings a study was made with, and its optimizers; None if there is no study."""
    found = [s for s in storage.get_all_studies()
             if s.user_attrs.get("labctl_study") == study]
    if not found:
        return None
    return {**found[0].user_attrs, "optimizers": [s.user_attrs["optimizer"] for s in found]}


def list_studies(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """Every labctl study in ``storage``: name, objective and finished trials per optimizer."""
    studies: dict[str, dict[str, Any]] = {}
    for summary in storage.get_all_studies():
        attrs = summary.user_attrs
        if "labctl_study" not in attrs:
            continue
        entry = studies.setdefault(attrs["labctl_study"], {
            "study": attrs["labctl_study"], "objective": attrs["objective"],
            "target": attrs["target"], "model": attrs["base"].get("model"),
            "dataset": attrs["base"].get("dataset"), "epochs": attrs["base"].get("epochs"),
            "trials": attrs.get("trials"), "finished_trials": {}})
        trials = storage.get_all_trials(summary._study_id, deepcopy=False,
                                        states=(TrialState.COMPLETE,))
        entry["finished_trials"][attrs["optimizer"]] = len(trials)
    return sorted(studies.values(), key=lambda s: s["study"])  # tu-<time> ids sort by age


# -- trial jobs ------------------------------------------------------------------------------

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


def best_trials(studies: dict[str, optuna.Study]) -> dict[str, dict[str, Any]]:
    """Per optimizer: finished trials, and the best one's parameters, value and job."""
    result = {}
    for opt, study in studies.items():
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        entry: dict[str, Any] = {"study": study.study_name, "finished_trials": len(complete),
                                 "failed_trials": len(study.get_trials(
                                     deepcopy=False, states=(TrialState.FAIL,))),
                                 "best": None}
        if complete:
            best = study.best_trial
            entry["best"] = {"trial": best.number, "value": best.value,
                             "params": dict(best.params),
                             "job_id": best.user_attrs.get("job_id")}
        result[opt] = entry
    return result


def trial_history(study: optuna.Study) -> list[dict[str, Any]]:
    """Finished trials in order: number, value and parameters (for plots and the report)."""
    return [{"trial": t.number, "value": t.value, "params": dict(t.params),
             "job_id": t.user_attrs.get("job_id")}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]

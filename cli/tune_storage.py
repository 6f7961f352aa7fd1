"""Where ``labctl tune`` keeps its studies, and what it reads back from them.

One labctl study is one Optuna study per optimizer, named ``<study>.<optimizer>``, all with
the same settings (base spec, objective, target, sampler seed) kept in its user attributes.
The studies live in Optuna's journal storage: a file under the artefacts root for
``--local``, Redis (``LABCTL_REDIS_URL``) otherwise, so every ``labctl tune`` pointed at
that Redis, on any host, shares them. The loop that runs trials is ``tune_driver.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from labctl.cli.tune_space import OBJECTIVES, space_as_json

#: Key prefix of the studies' journal in Redis, apart from the job records.
REDIS_PREFIX = "labctl:optuna"
#: The local journal, under the artefacts root.
LOCAL_JOURNAL = Path("studies") / "optuna-journal.log"
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
        trials = storage.get_all_trials(storage.get_study_id_from_name(summary.study_name),
                                        deepcopy=False, states=(TrialState.COMPLETE,))
        entry["finished_trials"][attrs["optimizer"]] = len(trials)
    return sorted(studies.values(), key=lambda s: s["study"])  # tu-<time> ids sort by age



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

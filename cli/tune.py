"""``labctl tune``: the same Optuna budget for each optimizer, every trial a labctl job.

stdout: a table of each optimizer's finished trials and best configuration (one JSON object
with ``--json``); trial progress goes to stderr. ``--study NAME`` resumes a study (a larger
``--trials`` adds trials) and ``--list`` lists them. ``--final-seeds K`` then reruns each
best configuration on the test split over K seeds, as a sweep ``labctl compare`` reads.
"""

from __future__ import annotations

import json
import math
import secrets
import sys
from datetime import UTC, datetime
from typing import Any, get_args

import click

from labctl.cli import tune_driver as td
from labctl.cli import tune_storage as ts
from labctl.cli.errors import EXIT_INTERRUPTED, BadSpec, JobFailed
from labctl.cli.run import artifacts_dir_option, checked_for_this_host
from labctl.cli.spec_options import spec_options, to_spec
from labctl.cli.tune_space import (
    DEFAULT_TARGET,
    DEFAULT_VALIDATION,
    OBJECTIVES,
    SEARCH_SPACE,
    space_as_json,
)
from labctl.shared.artifacts import ArtifactStore
from labctl.shared.settings import get_settings
from labctl.shared.spec import NAME_PATTERN, Optimizer

#: Spec fields each trial sets itself: they are not part of the study's shared base.
TRIAL_FIELDS = ("optimizer", "lr", "betas", "eps", "weight_decay", "tags", "sweep_id")
#: A study's name goes into every trial's tags (50 characters at most).
MAX_STUDY_NAME = 40


def new_study_id(now: datetime | None = None) -> str:
    """``tu-20261203-150000-abc123``: sorts by time, never parses as a job or sweep id."""
    now = now or datetime.now(UTC)
    return f"tu-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def parse_optimizers(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in str(text).split(",")]
    known = get_args(Optimizer)
    for name in names:
        if name not in known:
            raise BadSpec(f"optimizer: {name!r} is not one of {', '.join(known)}")
    if len(set(names)) != len(names):
        raise BadSpec("optimizer: each optimizer may be named once")
    return names


@click.command("tune", short_help=(
    "Tune each optimizer with the same Optuna budget; every trial is a labctl job."))
@spec_options
@click.option("--trials", type=click.IntRange(1, 10_000), default=None,
              help="finished trials per optimizer: the budget (resuming with more adds "
                   "trials)  [20]")
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), default=None,
              help="best validation accuracy (maximised), or epochs until the validation "
                   "accuracy reaches --target (minimised; a miss counts as never)  [accuracy]")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=None,
              help=f"accuracy for time-to-target  [{DEFAULT_TARGET}]")
@click.option("--study", "study_name", default=None,
              help="study name: resumes it if it exists  [a new tu-... id]")
@click.option("--sampler-seed", type=click.IntRange(0, 2**32 - 1), default=None,
              help="seed of the TPE sampler, the same for every optimizer  [0]")
@click.option("--parallel", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="trials in the queue at once (queued studies)")
@click.option("--final-seeds", type=click.IntRange(0, 1000), default=0,
              help="then run each optimizer's best configuration on the test split over "
                   "seeds 0..K-1 (a sweep for labctl compare)")
@click.option("--local", is_flag=True, help="run the trials here, one after another")
@click.option("--list", "list_only", is_flag=True, help="list the studies and exit")
@artifacts_dir_option
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
def tune(spec_values: dict, trials: int | None, objective: str | None, target: float | None,
         study_name: str | None, sampler_seed: int | None, parallel: int, final_seeds: int,
         local: bool, list_only: bool, artifacts_dir: str | None, as_json: bool) -> None:
    """Tune Adam and AdaMax fairly: for each optimizer named (--opt adam,adamax), the same
    number of trials over the same search space, sampled by the same seeded TPE sampler,
    each trial scored on a validation split carved from the training data (the test split
    is left for --final-seeds).

    Example: labctl tune --model numpy-cnn --dataset digits --opt adam,adamax --trials 4
    --epochs 2 --local
    """
    root = artifacts_dir or get_settings().artifacts_dir
    store = ArtifactStore(root)
    records = None
    if not local:
        from labctl.cli.broker import open_records

        records = open_records()  # exit 69 before anything else when Redis is away
    storage = _storage(local, root)
    if list_only:
        _print_list(ts.list_studies(storage), as_json)
        return

    study_name = _checked_name(study_name) if study_name else new_study_id()
    stored = ts.stored_settings(storage, study_name)
    settings = _settings(study_name, spec_values, stored, objective, target, sampler_seed)
    budget = trials or (stored or {}).get("trials") or 20
    if local:
        for opt in settings.optimizers:  # data and device checked before any trial starts
            checked_for_this_host(to_spec({**settings.base, "optimizer": opt}))
    try:
        studies = ts.open_studies(storage, settings)
    except ts.SettingsMismatch as exc:
        raise BadSpec(str(exc)) from None
    for study in studies.values():
        study.set_user_attr("trials", max(budget, study.user_attrs.get("trials") or 0))
    click.echo(f"study {study_name}: {budget} trial(s) per optimizer "
               f"({', '.join(settings.optimizers)}), objective {settings.objective}"
               f"{f' (target {settings.target:g})' if settings.objective != 'accuracy' else ''}"
               f", {'here' if local else 'through the queue'}", err=True)
    jobs = td.LocalJobs(store) if local else td.QueuedJobs(store, records)
    driver = td.Driver(studies, settings, jobs, store, budget,
                       parallel=1 if local else parallel,
                       on_start=_echo_start, on_result=_echo_result)
    try:
        driver.run()
    except td.TrialFailed as exc:
        raise JobFailed(f"{exc} (resume with: labctl tune --study {study_name})") from None
    except KeyboardInterrupt:
        click.echo(f"\nstopped; resume with: labctl tune --study {study_name}"
                   f"{' --local' if local else ''}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    result = summary(settings, studies, budget, local)
    if final_seeds:
        from labctl.cli.tune_final import run_final

        result["final"] = run_final(settings, result["optimizers"], final_seeds, jobs, store,
                                    local=local, artifacts_dir=artifacts_dir)
    _write_snapshot(root, result, studies)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(render_table(result))


def _write_snapshot(root: str, result: dict[str, Any], studies: dict) -> None:
    """The study as the report reads it, from artefacts alone (no Redis)."""
    from labctl.cli.analysis.tuned_report import write_snapshot

    history = {opt: [{**t, "value": _finite(t["value"])} for t in ts.trial_history(study)]
               for opt, study in studies.items()}
    try:
        path = write_snapshot(root, {**result, "history": history})
    except OSError as exc:
        click.echo(f"labctl: could not write the study snapshot: {exc.strerror}", err=True)
        return
    click.echo(f"study snapshot: {path} (labctl report ... --study {result['study']})",
               err=True)


def _storage(local: bool, root: str):
    try:
        return ts.open_storage(local=local, artifacts_root=root,
                               redis_url=get_settings().redis_url)
    except OSError as exc:
        raise BadSpec(f"cannot open the study journal under {root}: {exc.strerror}") from None


def _checked_name(name: str) -> str:
    import re

    if not re.fullmatch(NAME_PATTERN, name) or len(name) > MAX_STUDY_NAME:
        raise BadSpec(f"--study: {name!r} must be 1-{MAX_STUDY_NAME} letters, digits or ._- "
                      "(starting with a letter or digit)")
    return name


def _settings(study_name: str, spec_values: dict, stored: dict | None,
              objective: str | None, target: float | None, sampler_seed: int | None):
    """The study's settings: those given, else (resuming) those it was made with."""
    values = dict(spec_values)
    optimizers = parse_optimizers(values.pop("optimizer", None))
    searched = [k for k in ("lr", "betas", "eps", "weight_decay") if k in values]
    if searched:
        raise BadSpec(f"{searched[0]}: labctl tune searches it for each trial; leave it out "
                      "(the search space is in labctl tune --help and the README)")
    if stored is not None:
        # Flags given on resuming must agree with the study (open_studies checks); the
        # others come from it, so `labctl tune --study NAME --trials 40` is enough.
        values = {**stored["base"], **values}
    values.setdefault("validation", DEFAULT_VALIDATION)
    first = to_spec({**values, "optimizer": (optimizers or ["adam"])[0]})
    base = {k: v for k, v in first.model_dump(mode="json").items() if k not in TRIAL_FIELDS}
    stored = stored or {}
    return ts.StudySettings(
        study=study_name,
        optimizers=optimizers or stored.get("optimizers") or ["adam", "adamax"],
        base=base,
        objective=objective or stored.get("objective") or "accuracy",
        target=target if target is not None else stored.get("target", DEFAULT_TARGET),
        sampler_seed=sampler_seed if sampler_seed is not None
        else stored.get("sampler_seed", 0),
        validation=base["validation"])


def _echo_start(opt: str, number: int, job_id: str, params: dict[str, float]) -> None:
    shown = " ".join(f"{k}={v:.3g}" for k, v in params.items())
    click.echo(f"[{opt} trial {number}] {job_id} {shown}", err=True)


def _echo_result(result) -> None:
    if result.value is None:
        click.echo(f"[{result.optimizer} trial {result.trial_number}] {result.job_id} "
                   f"{result.state}: {result.error}", err=True)
        return
    note = " (diverged)" if result.state != "succeeded" else ""
    click.echo(f"[{result.optimizer} trial {result.trial_number}] {result.job_id} "
               f"value {_value(result.value)}{note}", err=True)


def _value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "never"
    return f"{value:.4f}" if value < 1.0 or value != int(value) else f"{value:g}"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary(settings, studies: dict, budget: int, local: bool) -> dict[str, Any]:
    """The study as JSON: settings, budget, space and each optimizer's best trial. A
    time-to-target value that never reached the target is ``null`` with
    ``reached_target: false`` (JSON has no infinity)."""
    optimizers = ts.best_trials(studies)
    for entry in optimizers.values():
        best = entry["best"]
        if best is not None:
            if settings.objective == "time-to-target":
                best["reached_target"] = best["value"] is not None and math.isfinite(best["value"])
            best["value"] = _finite(best["value"])
    return {"study": settings.study, "mode": "local" if local else "queue",
            "objective": settings.objective, "direction": OBJECTIVES[settings.objective],
            "target": settings.target, "validation": settings.validation, "trials": budget,
            "sampler": {"name": "TPESampler", "seed": settings.sampler_seed},
            "search_space": space_as_json(), "base": settings.base, "optimizers": optimizers}


def render_table(result: dict[str, Any]) -> str:
    what = ("best validation accuracy" if result["objective"] == "accuracy"
            else f"epochs to {result['target']:g} validation accuracy")
    header = ["optimizer", "finished", what, *(r.name for r in SEARCH_SPACE), "job"]
    rows = [header]
    for opt, entry in result["optimizers"].items():
        best = entry["best"] or {}
        params = best.get("params") or {}
        value = best.get("value")
        if best and value is None:
            value = math.inf  # time-to-target never reached
        rows.append([opt, f"{entry['finished_trials']}/{result['trials']}",
                     _value(value) if best else "n/a",
                     *(f"{params[r.name]:.3g}" if r.name in params else "-"
                       for r in SEARCH_SPACE),
                     best.get("job_id") or "-"])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [f"study {result['study']} (TPE seed {result['sampler']['seed']}, "
             f"validation {result['validation']:g} of the training split)"]
    lines += ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    final = result.get("final")
    if final:
        lines.append(f"final runs on the test split: labctl compare {final['sweep_id']}")
    return "\n".join(lines)


def _print_list(studies: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(studies, indent=2))
        return
    if not studies:
        click.echo("no studies", err=True)
        return
    for study in studies:
        counts = ", ".join(f"{opt} {n}" for opt, n in study["finished_trials"].items())
        click.echo(f"{study['study']}  {study['model']} on {study['dataset']}, "
                   f"{study['epochs']} epochs, {study['objective']}: {counts} finished")

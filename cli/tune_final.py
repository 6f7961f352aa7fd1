"""The final runs of a study: each optimizer's best configuration, trained on the full
training split and scored once on the test split, over seeds 0..K-1 (initial weights and
data order vary with the seed). They form a sweep, ``<study>-final``, that ``labctl
compare`` and ``labctl report`` read like any other, runs paired by seed."""

from __future__ import annotations

import time
from typing import Any

import click

from labctl.cli.analysis.manifest import thread_env, write_manifest
from labctl.cli.spec_options import to_spec
from labctl.cli.tune_space import spec_values
from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.jobstate import is_terminal
from labctl.shared.spec import JobSpec


def final_sweep_id(study: str) -> str:
    return f"{study}-final"


def final_specs(settings: Any, optimizers: dict[str, dict[str, Any]], seeds: int
                ) -> list[tuple[dict[str, Any], JobSpec]]:
    """(grid params, spec) per optimizer with a best trial and per seed; no validation
    split: the test split is what these runs are for."""
    sweep_id = final_sweep_id(settings.study)
    jobs = []
    for opt, entry in optimizers.items():
        if entry["best"] is None:
            continue
        tuned = spec_values(entry["best"]["params"])
        for seed in range(seeds):
            spec = to_spec({**settings.base, "validation": None, "optimizer": opt, **tuned,
                            "seed": seed, "sweep_id": sweep_id,
                            "tags": ["tuned", f"study={settings.study}"]})
            jobs.append(({"optimizer": opt, "seed": seed}, spec))
    return jobs


def run_final(settings: Any, optimizers: dict[str, dict[str, Any]], seeds: int, jobs: Any,
              store: ArtifactStore, *, local: bool, artifacts_dir: str | None
              ) -> dict[str, Any]:
    """Run (or queue and wait for) every final job; the sweep's id, jobs and their states."""
    from labctl.cli.tune_driver import POLL_SECONDS

    sweep_id = final_sweep_id(settings.study)
    planned = final_specs(settings, optimizers, seeds)
    entries = [{"job_id": new_job_id(), "params": params} for params, _ in planned]
    base = {k: v for k, v in settings.base.items() if k != "validation"}
    manifest = write_manifest(
        store.root, sweep_id, mode="local" if local else "queue", base=base,
        grid={"optimizer": list(dict.fromkeys(p["optimizer"] for p, _ in planned)),
              "seed": list(range(seeds))},
        jobs=entries, env=thread_env() if local else None, seeds=seeds,
        artifacts_dir=artifacts_dir)
    click.echo(f"final runs {sweep_id}: {len(entries)} job(s) on the test split", err=True)
    for entry, (params, spec) in zip(entries, planned, strict=True):
        click.echo(f"[final {params['optimizer']} seed {params['seed']}] {entry['job_id']}",
                   err=True)
        jobs.start(spec, entry["job_id"])
    states = {}
    for entry in entries:
        while not is_terminal(state := jobs.state(entry["job_id"])):
            time.sleep(POLL_SECONDS)
        states[entry["job_id"]] = state
    return {"sweep_id": sweep_id, "manifest": str(manifest), "seeds": seeds,
            "jobs": [{**e, "state": states[e["job_id"]]} for e in entries]}

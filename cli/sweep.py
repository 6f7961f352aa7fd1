"""``labctl sweep``: a grid of jobs (comma lists x seeds), queued or run here in turn.

stdout: the sweep id on the first line, then one job id per line (or one JSON object with
``--json``), so ``labctl sweep ... > ids; SWEEP=$(head -1 ids)`` scripts it. The manifest
``<artifacts>/sweeps/<sweep_id>.json`` lets compare and report find the sweep later.
"""

from __future__ import annotations

import json
import sys

import click

from labctl.cli.analysis.grid import GridError, combinations, split_values
from labctl.cli.analysis.manifest import new_sweep_id, thread_env, write_manifest
from labctl.cli.broker import open_records, submit_or_exit
from labctl.cli.errors import EXIT_INTERRUPTED, BadSpec, JobFailed
from labctl.cli.foreground import run_in_foreground
from labctl.cli.run import artifacts_dir_option, checked_for_this_host
from labctl.cli.spec_options import spec_options, to_spec
from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.settings import get_settings
from labctl.shared.spec import JobSpec
from labctl.worker.runner import KeyboardInterruptWithOutcome


def build_grid(spec_values: dict, seeds: int | None, sweep_id: str
               ) -> tuple[dict, dict[str, list], list[tuple[dict, JobSpec]]]:
    """Validate every spec of the grid before anything is submitted or run: a typo in the
    third value must not leave a half-submitted sweep."""
    try:
        base, raw_grid = split_values(spec_values, seeds)
    except GridError as exc:
        raise BadSpec(str(exc)) from None
    jobs = []
    for params in combinations(raw_grid):
        spec = to_spec({**base, **params, "sweep_id": sweep_id})
        dumped = spec.model_dump(mode="json")
        # Record the parsed value ("1e-3" -> 0.001) so the manifest matches the specs.
        jobs.append(({name: dumped[name] for name in params}, spec))
    grid = {name: list(dict.fromkeys(params[name] for params, _ in jobs)) for name in raw_grid}
    first = jobs[0][1].model_dump(mode="json")
    return {name: first[name] for name in base}, grid, jobs


@click.command("sweep", short_help=(
    "Submit a grid of jobs: the product of the comma lists given, times the seeds."))
@spec_options(lists=True)
@click.option("--seeds", type=int, default=None,
              help="run seeds 0..N-1 (or give --seed 0,1,2)")
@click.option("--local", is_flag=True,
              help="run the jobs here, one after another, instead of queueing them")
@artifacts_dir_option
@click.option("--json", "as_json", is_flag=True, help="print the sweep as one JSON object")
def sweep(spec_values: dict, seeds: int | None, local: bool, artifacts_dir: str | None,
          as_json: bool) -> None:
    """Submit a grid of jobs: every spec flag takes a comma list (--opt adam,adamax
    --lr 1e-3,2e-3) and the grid is their product with the seeds.

    Example: labctl sweep --model numpy-cnn --dataset digits --opt adam,adamax --seeds 3
    """
    sweep_id = new_sweep_id()
    base, grid, jobs = build_grid(spec_values, seeds, sweep_id)
    root = artifacts_dir or get_settings().artifacts_dir
    click.echo(f"sweep {sweep_id}: {len(jobs)} job(s) over "
               f"{', '.join(f'{k}={v}' for k, v in grid.items()) or 'a single spec'}", err=True)
    entries: list[dict] = []

    def save() -> str:
        # Queued jobs run with the worker's environment, not this shell's.
        return str(write_manifest(root, sweep_id, mode="local" if local else "queue",
                                  base=base, grid=grid, jobs=entries,
                                  env=thread_env() if local else None, seeds=seeds,
                                  artifacts_dir=artifacts_dir))

    if local:  # this host runs the jobs: check data and device for all before any starts
        jobs = [(params, checked_for_this_host(spec)) for params, spec in jobs]
        entries = [{"job_id": new_job_id(), "params": params} for params, _ in jobs]
        manifest = save()
        if not as_json:
            _print_ids(sweep_id, entries)
        states = _run_locally(root, entries, [spec for _, spec in jobs])
        failed = [job_id for job_id, state in states.items() if state != "succeeded"]
    else:
        manifest = _submit_all(jobs, entries, save)
        states = {entry["job_id"]: "queued" for entry in entries}
        failed = []
        if not as_json:
            _print_ids(sweep_id, entries)
    if as_json:
        click.echo(json.dumps({"sweep_id": sweep_id, "mode": "local" if local else "queue",
                               "manifest": manifest, "grid": grid,
                               "jobs": [{**e, "state": states[e["job_id"]]} for e in entries]},
                              indent=2))
    click.echo(f"manifest: {manifest}", err=True)
    if failed:
        raise JobFailed(f"{len(failed)} of {len(jobs)} job(s) did not succeed: "
                        + ", ".join(failed))


def _print_ids(sweep_id: str, entries: list[dict]) -> None:
    click.echo(sweep_id)
    for entry in entries:
        click.echo(entry["job_id"])
    sys.stdout.flush()  # a script tailing the ids sees them before the first job ends


def _run_locally(root: str, entries: list[dict], specs: list[JobSpec]) -> dict[str, str]:
    """Run each job to its end; job id -> final state. A failed job does not stop the rest.
    States stay out of the manifest: each job's status.json is the one place for them."""
    store = ArtifactStore(root)
    states = {}
    for n, (entry, spec) in enumerate(zip(entries, specs, strict=True), start=1):
        job_id = entry["job_id"]
        settings = " ".join(f"{k}={v}" for k, v in entry["params"].items())
        click.echo(f"[{n}/{len(entries)}] {job_id} {settings}".rstrip(), err=True)
        try:
            outcome = run_in_foreground(spec, job_id, store)
        except KeyboardInterruptWithOutcome:
            click.echo(f"\ncancelled at job {n}/{len(entries)}; finished jobs are kept "
                       f"(compare them with: labctl compare {spec.sweep_id})", err=True)
            sys.exit(EXIT_INTERRUPTED)
        states[job_id] = outcome.state
        if outcome.state != "succeeded":
            click.echo(f"labctl: job {job_id} {outcome.state}: {outcome.error}", err=True)
        else:
            final = outcome.summary.get("final") or {}
            click.echo(f"[{n}/{len(entries)}] {job_id} succeeded: test accuracy "
                       f"{final.get('test_accuracy', float('nan')):.4f}, macro-F1 "
                       f"{final.get('test_f1_macro', float('nan')):.4f} "
                       f"({outcome.summary.get('total_seconds', 0):.1f}s)", err=True)
    return states


def _submit_all(jobs: list[tuple[dict, JobSpec]], entries: list[dict], save) -> str:
    """Queue every job. If the broker fails half-way, the manifest still lists the jobs
    already queued (so they stay findable) before the error exits 69."""
    records = open_records()  # exit 69 here, before anything is queued
    try:
        for params, spec in jobs:
            # An unset data_root stays unset: the worker resolves it where the data lives.
            job_id = submit_or_exit(spec, records)
            entries.append({"job_id": job_id, "params": params})
    finally:
        if entries:
            manifest = save()
    return manifest

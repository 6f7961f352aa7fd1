"""``labctl sweep``: grid expansion, comma lists, validation before anything runs, local runs
of real short jobs, and queue submission to a private redis-server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from labctl.cli.analysis.grid import sweep_command
from labctl.cli.analysis.manifest import read_manifest
from labctl.cli.main import cli
from labctl.cli.sweep import build_grid
from labctl.shared.artifacts import JOB_ID_PATTERN, ArtifactStore
from labctl.shared.records import JobRecords
from labctl.shared.spec import NAME_PATTERN

runner = CliRunner()
#: Real numpy-cnn jobs that finish in a second or two on digits.
TINY = ["--model", "numpy-cnn", "--dataset", "digits", "--epochs", "2", "--limit-train", "300",
        "--limit-test", "100", "--batch-size", "32"]


def sweep(*args: str, env: dict | None = None):
    return runner.invoke(cli, ["sweep", *args], catch_exceptions=False, env=env)


def test_grid_is_the_product_with_seeds_outermost():
    values = {"model": "numpy-cnn", "dataset": "digits", "optimizer": "adam,adamax",
              "lr": "1e-3, 2e-3"}
    base, grid, jobs = build_grid(values, seeds=3, sweep_id="sw-x")
    assert base == {"model": "numpy-cnn", "dataset": "digits"}
    assert grid == {"seed": [0, 1, 2], "optimizer": ["adam", "adamax"], "lr": [0.001, 0.002]}
    assert len(jobs) == 12
    params = [p for p, _ in jobs]
    assert params[:4] == [{"seed": 0, "optimizer": o, "lr": lr}
                          for o in ("adam", "adamax") for lr in (0.001, 0.002)]
    assert {(p["seed"], p["optimizer"], p["lr"]) for p in params} == {
        (s, o, lr) for s in range(3) for o in ("adam", "adamax") for lr in (0.001, 0.002)}
    for p, spec in jobs:
        assert (spec.seed, spec.optimizer, spec.lr) == (p["seed"], p["optimizer"], p["lr"])
        assert spec.sweep_id == "sw-x" and spec.model == "numpy-cnn"


def test_seed_list_and_single_values():
    _, grid, jobs = build_grid({"seed": "4,7", "epochs": "3"}, seeds=None, sweep_id="sw-x")
    assert grid == {"seed": [4, 7]}
    assert [spec.seed for _, spec in jobs] == [4, 7]
    assert all(spec.epochs == 3 for _, spec in jobs)
    _, grid, jobs = build_grid({"optimizer": "adam"}, seeds=None, sweep_id="sw-x")
    assert grid == {} and len(jobs) == 1


@pytest.mark.parametrize("args, mentions", [
    (["--opt", "adam,adamx"], "optimizer: Input should be 'adam' or 'adamax'"),
    (["--opt", "adam,,adamax"], "optimizer: empty value in comma list"),
    (["--opt", "adam,adam"], "optimizer: repeated value"),
    (["--epochs", "2,0"], "epochs: Input should be greater than or equal to 1"),
    (["--lr", "1e-3,x"], "lr:"),
    (["--seed", "1", "--seeds", "2"], "give --seeds N or --seed LIST, not both"),
    (["--seeds", "0"], "seeds: must be at least 1"),
    (["--seeds", "40", "--lr", ",".join(str(i) for i in range(1, 30))], "at most 1000"),
])
def test_bad_values_exit_2_before_anything_runs(tmp_path, args, mentions):
    result = sweep("--model", "numpy-cnn", "--dataset", "digits", *args, "--local",
                   "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("labctl: ") and mentions in lines[0]
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad grid"


def test_local_sweep_runs_real_jobs_and_writes_the_manifest(tmp_path):
    result = sweep(*TINY, "--opt", "adam,adamax", "--seeds", "2", "--local",
                   "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    sweep_id, *job_ids = result.stdout.split()
    assert sweep_id.startswith("sw-")
    assert re.fullmatch(NAME_PATTERN, sweep_id)
    assert len(job_ids) == 4 and all(JOB_ID_PATTERN.fullmatch(j) for j in job_ids)

    manifest = read_manifest(tmp_path, sweep_id)
    assert manifest["mode"] == "local"
    assert manifest["grid"] == {"seed": [0, 1], "optimizer": ["adam", "adamax"]}
    assert [j["job_id"] for j in manifest["jobs"]] == job_ids
    store = ArtifactStore(tmp_path)
    for entry in manifest["jobs"]:
        folder = store.job(entry["job_id"])
        spec = folder.read_spec()
        assert spec["sweep_id"] == sweep_id
        assert (spec["seed"], spec["optimizer"]) == (entry["params"]["seed"],
                                                     entry["params"]["optimizer"])
        assert folder.read_status()["state"] == "succeeded"
        assert len(folder.read_metrics()) == 2
    # The manifest reproduces the grid as a command line.
    command = sweep_command(manifest)
    # A local sweep records thread settings it ran with (OPENBLAS_NUM_THREADS=1 ...) first.
    env_prefix, _, rest = command.partition("labctl sweep ")
    assert all("=" in word for word in env_prefix.split())
    assert rest.startswith("--model numpy-cnn --opt adam,adamax")
    assert command.endswith(f"--seeds 2 --local --artifacts-dir {tmp_path}")

    # compare finds the sweep from the artefacts alone.
    compared = runner.invoke(cli, ["compare", sweep_id, "--artifacts-dir", str(tmp_path),
                                   "--json"], catch_exceptions=False)
    assert compared.exit_code == 0, compared.output
    (block,) = json.loads(compared.stdout)["blocks"]
    assert [g["seeds"] for g in block["groups"]] == [[0, 1], [0, 1]]
    assert block["tests"][0]["n_pairs"] == 2


def test_local_sweep_json_and_thread_settings(tmp_path):
    result = sweep(*TINY, "--epochs", "1", "--opt", "adamax", "--local", "--json",
                   "--artifacts-dir", str(tmp_path), env={"LABCTL_NUMPY_THREADS": "1"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mode"] == "local" and len(data["jobs"]) == 1
    assert data["jobs"][0]["state"] == "succeeded"
    # Thread settings change a local run's timings, so the manifest keeps them ...
    manifest = read_manifest(tmp_path, data["sweep_id"])
    assert manifest["env"]["LABCTL_NUMPY_THREADS"] == "1"
    # ... and the rebuilt command sets them again.
    assert sweep_command({**manifest, "env": {"LABCTL_NUMPY_THREADS": "1"}}).startswith(
        "LABCTL_NUMPY_THREADS=1 labctl sweep --model numpy-cnn --opt adamax")
    assert manifest["jobs"] == [{k: v for k, v in j.items() if k != "state"}
                                for j in data["jobs"]]


def test_queue_sweep_submits_every_job_to_redis(redis_server, labctl_env, tmp_path):
    env = labctl_env(redis_url=redis_server.url)
    result = sweep(*TINY, "--opt", "adam,adamax", "--seeds", "3")
    assert result.exit_code == 0, result.output
    sweep_id, *job_ids = result.stdout.split()
    assert len(job_ids) == 6
    records = JobRecords(redis_server.client())
    for job_id in job_ids:
        record = records.get(job_id)
        assert record["state"] == "queued" and record["sweep_id"] == sweep_id
        assert record["queue"] == "cpu"  # numpy-cnn routes to the cpu queue
        assert record["spec"]["data_root"] is None  # left for the worker to fill in
    manifest = read_manifest(env["LABCTL_ARTIFACTS_DIR"], sweep_id)
    assert manifest["mode"] == "queue"
    assert [j["job_id"] for j in manifest["jobs"]] == job_ids
    assert {(j["params"]["seed"], j["params"]["optimizer"]) for j in manifest["jobs"]} == {
        (s, o) for s in range(3) for o in ("adam", "adamax")}


def test_queue_sweep_without_redis_exits_69(labctl_env):
    from labctl.shared.testing import free_port

    env = labctl_env(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    result = sweep(*TINY, "--opt", "adam,adamax")
    assert result.exit_code == 69, result.output
    assert result.stdout == "" and "unreachable" in result.stderr
    assert not (Path(env["LABCTL_ARTIFACTS_DIR"]) / "sweeps").exists()


@pytest.mark.integration
def test_queue_sweep_runs_on_a_real_worker_and_compare_reads_its_artefacts(
        redis_server, labctl_env, tmp_path):
    from labctl.shared.testing import WorkerProcess, wait_for

    env = labctl_env(redis_url=redis_server.url)
    worker = WorkerProcess(redis_server.url, tmp_path / "worker.log", queues="cpu",
                           env=env).start().wait_ready()
    try:
        result = sweep(*TINY, "--opt", "adam,adamax", "--seeds", "2")
        assert result.exit_code == 0, result.output
        sweep_id, *job_ids = result.stdout.split()
        records = JobRecords(redis_server.client())
        wait_for(lambda: all(records.get(j)["state"] in ("succeeded", "failed", "cancelled")
                             for j in job_ids), timeout=240, what="the sweep's jobs to end")
        assert [records.get(j)["state"] for j in job_ids] == ["succeeded"] * 4, \
            worker.log_text()[-2000:]
    finally:
        worker.stop()

    compared = runner.invoke(cli, ["compare", sweep_id, "--json",
                                   "--artifacts-dir", env["LABCTL_ARTIFACTS_DIR"]])
    assert compared.exit_code == 0, compared.output
    (block,) = json.loads(compared.stdout)["blocks"]
    test = next(t for t in block["tests"] if t["figure"] == "final_accuracy")
    assert test["n_pairs"] == 2 and test["seeds"] == [0, 1]
    assert test["difference"] == "adamax - adam"


def test_local_sweep_checks_the_host_before_any_job_starts(tmp_path):
    art = tmp_path / "art"
    result = sweep("--model", "numpy-cnn", "--dataset", "mnist", "--data-root",
                   str(tmp_path / "nowhere"), "--opt", "adam,adamax", "--epochs", "1",
                   "--local", "--artifacts-dir", str(art))
    assert result.exit_code == 2
    assert "data_root" in result.stderr
    assert not art.exists() or not ArtifactStore(art).job_ids()

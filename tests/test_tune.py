"""``labctl tune``: real short Optuna studies on digits, here and through a real
redis-server with two real workers sharing one study; final runs that compare reads."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.cli.tune_space import SEARCH_SPACE, epochs_to_target, score
from labctl.shared.artifacts import ArtifactStore
from labctl.shared.records import JobRecords

runner = CliRunner()
#: Trials that finish in a second or two.
SMALL = ["--model", "numpy-cnn", "--dataset", "digits", "--epochs", "1", "--limit-train", "300",
         "--batch-size", "32"]


def tune(*args: str, env: dict | None = None):
    return runner.invoke(cli, ["tune", *args], catch_exceptions=False, env=env)


def in_space(params: dict[str, float]) -> bool:
    return all(r.low <= params[r.name] <= r.high for r in SEARCH_SPACE)


@pytest.fixture(scope="module")
def done_when(tmp_path_factory):
    """The issue's command, as written, in a fresh artefacts folder."""
    root = tmp_path_factory.mktemp("tune")
    result = tune("--model", "numpy-cnn", "--dataset", "digits", "--opt", "adam,adamax",
                  "--trials", "4", "--epochs", "2", "--local", "--json",
                  "--artifacts-dir", str(root))
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout)


def test_the_done_when_command_gives_each_optimizer_four_trials_and_a_best(done_when):
    root, data = done_when
    assert set(data["optimizers"]) == {"adam", "adamax"}
    assert data["objective"] == "accuracy" and data["sampler"] == {"name": "TPESampler",
                                                                   "seed": 0}
    for entry in data["optimizers"].values():
        assert entry["finished_trials"] == 4
        best = entry["best"]
        assert in_space(best["params"]) and 0 < best["value"] <= 1
        # The best trial is an ordinary job: its folder says it scored on validation.
        folder = ArtifactStore(root).job(best["job_id"])
        summary = folder.read_summary()
        assert summary["evaluated_on"] == "validation"
        assert folder.read_spec()["lr"] == pytest.approx(best["params"]["lr"])
        assert max(r["test_accuracy"] for r in folder.read_metrics()) == best["value"]
    trial_jobs = [j for j in ArtifactStore(root).job_ids()]
    assert len(trial_jobs) == 8  # one job per trial, no other
    specs = [ArtifactStore(root).job(j).read_spec() for j in trial_jobs]
    assert all(s["validation"] == 0.2 and "tune" in s["tags"] for s in specs)


def test_the_same_seeded_sampler_proposes_the_same_configurations_to_each_optimizer(done_when):
    root, data = done_when
    store = ArtifactStore(root)
    by_opt: dict[str, list] = {}
    for job in store.job_ids():
        spec = store.job(job).read_spec()
        by_opt.setdefault(spec["optimizer"], []).append((spec["lr"], tuple(spec["betas"])))
    assert sorted(by_opt["adam"]) == sorted(by_opt["adamax"])


def test_a_study_resumes_with_more_trials_and_is_listed(done_when):
    root, data = done_when
    study = data["study"]
    result = tune("--study", study, "--trials", "5", "--local", "--json",
                  "--artifacts-dir", str(root))
    assert result.exit_code == 0, result.output
    resumed = json.loads(result.stdout)
    assert [e["finished_trials"] for e in resumed["optimizers"].values()] == [5, 5]
    assert resumed["base"] == data["base"]  # the study's own settings, not the defaults
    assert len(ArtifactStore(root).job_ids()) == 10
    listed = tune("--list", "--local", "--json", "--artifacts-dir", str(root))
    (entry,) = json.loads(listed.stdout)
    assert entry["study"] == study and entry["finished_trials"] == {"adam": 5, "adamax": 5}
    plain = tune("--list", "--local", "--artifacts-dir", str(root))
    assert study in plain.stdout and "adam 5" in plain.stdout


def test_resuming_with_other_settings_is_one_line_naming_the_field(done_when):
    root, data = done_when
    result = tune("--study", data["study"], "--epochs", "3", "--local",
                  "--artifacts-dir", str(root))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"labctl: study {data['study']} was made with epochs=2, not 3; resume it with its "
        "own settings or name a new --study"]


def test_plain_output_is_a_table_with_each_optimizer(tmp_path):
    result = tune(*SMALL, "--opt", "adamax", "--trials", "1", "--local",
                  "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    head, header, row = result.stdout.strip().splitlines()
    assert header.split()[:2] == ["optimizer", "finished"] and "lr" in header.split()
    assert row.split()[:2] == ["adamax", "1/1"]


def test_time_to_target_counts_a_miss_as_never(tmp_path):
    missed = tune(*SMALL, "--opt", "adam", "--trials", "2", "--objective", "time-to-target",
                  "--target", "0.999", "--local", "--json", "--artifacts-dir", str(tmp_path))
    assert missed.exit_code == 0, missed.output
    best = json.loads(missed.stdout)["optimizers"]["adam"]["best"]
    assert best["value"] is None and best["reached_target"] is False
    reached = tune(*SMALL, "--opt", "adam", "--trials", "1", "--objective", "time-to-target",
                   "--target", "0.01", "--local", "--json", "--artifacts-dir", str(tmp_path))
    best = json.loads(reached.stdout)["optimizers"]["adam"]["best"]
    assert best["value"] == 1 and best["reached_target"] is True


def test_scores_from_epoch_rows():
    rows = [{"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.9},
            {"epoch": 3, "test_accuracy": 0.8}]
    assert score(rows, "accuracy", 0.95) == 0.9
    assert epochs_to_target(rows, 0.85) == 2
    assert math.isinf(score(rows, "time-to-target", 0.95))
    assert score([], "accuracy", 0.95) == 0.0


@pytest.mark.parametrize("args, message", [
    (["--opt", "adam,sgd"], "optimizer: 'sgd' is not one of adam, adamax"),
    (["--opt", "adam,adam"], "optimizer: each optimizer may be named once"),
    (["--study", "../x"], "--study: '../x' must be"),
    (["--validation", "0.9"], "validation:"),
    (["--lr", "1e-3"], "lr: labctl tune searches it for each trial"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = tune(*SMALL, *args, "--trials", "1", "--local", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"labctl: {message}")
    assert not ArtifactStore(tmp_path).job_ids()


def test_final_runs_rerun_each_best_configuration_on_the_test_split(tmp_path):
    result = tune(*SMALL, "--opt", "adam,adamax", "--trials", "1", "--final-seeds", "2",
                  "--local", "--json", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    final = data["final"]
    assert [j["state"] for j in final["jobs"]] == ["succeeded"] * 4
    store = ArtifactStore(tmp_path)
    for job in final["jobs"]:
        folder = store.job(job["job_id"])
        spec = folder.read_spec()
        best = data["optimizers"][spec["optimizer"]]["best"]["params"]
        assert spec["validation"] is None and spec["lr"] == pytest.approx(best["lr"])
        assert folder.read_summary()["evaluated_on"] == "test"
    compared = runner.invoke(cli, ["compare", final["sweep_id"], "--json",
                                   "--artifacts-dir", str(tmp_path)])
    assert compared.exit_code == 0, compared.output
    # Each optimizer at its own tuned rate: one setup, the two compared paired by seed.
    (block,) = json.loads(compared.stdout)["blocks"]
    assert [g["value"] for g in block["groups"]] == ["adam", "adamax"]
    assert block["tests"][0]["seeds"] == [0, 1]

    # The report shows the tuned comparison beside the defaults (here: the final sweep).
    out = tmp_path / "report"
    reported = runner.invoke(cli, ["report", final["sweep_id"], "--study", data["study"],
                                   "-o", str(out), "--artifacts-dir", str(tmp_path)])
    assert reported.exit_code == 0, reported.output
    text = (out / "report.md").read_text()
    assert f"## Tuned comparison: study `{data['study']}`" in text
    assert "| lr | 1e-05 to 0.1 | log-uniform |" in text
    assert "same budget of 1 trials" in text and "### Final runs on the test split" in text
    for name in (f"study_{data['study']}.png", f"final_{data['study']}.png"):
        assert f"]({name})" in text and (out / name).read_bytes()[:4] == b"\x89PNG"
    missing = runner.invoke(cli, ["report", final["sweep_id"], "--study", "tu-nope", "-o",
                                  str(out), "--artifacts-dir", str(tmp_path)])
    assert missing.exit_code == 3 and missing.stderr.startswith("labctl: no study tu-nope")


def test_a_queued_study_is_shared_by_two_workers_and_counts_each_trial_once(
        redis_server, labctl_env, tmp_path):
    import optuna

    from labctl.cli.tune_storage import REDIS_PREFIX, open_storage, optuna_name
    from labctl.shared.testing import WorkerProcess

    env = labctl_env(redis_url=redis_server.url)
    workers = [WorkerProcess(redis_server.url, tmp_path / f"{name}.log", name=name,
                             queues="cpu", env=env).start() for name in ("w1", "w2")]
    try:
        for worker in workers:
            worker.wait_ready()
        result = tune(*SMALL, "--epochs", "2", "--opt", "adam,adamax", "--trials", "3",
                      "--parallel", "4", "--study", "shared", "--json")
        assert result.exit_code == 0, result.output + workers[0].log_text()[-2000:]
    finally:
        for worker in workers:
            worker.stop()
    data = json.loads(result.stdout)
    assert data["mode"] == "queue"
    assert [e["finished_trials"] for e in data["optimizers"].values()] == [3, 3]
    # The study lives in Redis: read it back there, as another host's labctl would.
    storage = open_storage(local=False, artifacts_root=tmp_path, redis_url=redis_server.url)
    records = JobRecords(redis_server.client())
    ran_on = []
    for opt in ("adam", "adamax"):
        study = optuna.load_study(study_name=optuna_name("shared", opt), storage=storage)
        trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert len(trials) == 3 and len(study.trials) == 3  # none twice, none failed
        job_ids = [t.user_attrs["job_id"] for t in trials]
        assert len(set(job_ids)) == 3
        for trial, job_id in zip(trials, job_ids, strict=True):
            record = records.get(job_id)
            assert record["state"] == "succeeded" and record["attempts"] == 1
            ran_on.append(record["worker"].split("@")[0])
            rows = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id).read_metrics()
            assert trial.value == max(r["test_accuracy"] for r in rows)
    assert set(ran_on) == {"w1", "w2"}
    assert redis_server.client().keys(f"{REDIS_PREFIX}*")


def test_a_queued_study_without_redis_is_one_line_and_exit_69(labctl_env):
    from labctl.shared.testing import free_port

    labctl_env(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    for args in (["--list"], [*SMALL, "--trials", "1"]):
        result = tune(*args)
        assert result.exit_code == 69
        (line,) = result.stderr.strip().splitlines()
        assert "is unreachable" in line


def test_a_local_trial_left_running_by_a_dead_driver_fails_and_is_replaced(tmp_path):
    from labctl.cli.tune_storage import open_storage, optuna_name

    first = tune(*SMALL, "--opt", "adam", "--trials", "1", "--study", "crashy", "--local",
                 "--artifacts-dir", str(tmp_path))
    assert first.exit_code == 0, first.output
    import optuna

    storage = open_storage(local=True, artifacts_root=tmp_path, redis_url="redis://unused")
    study = optuna.load_study(study_name=optuna_name("crashy", "adam"), storage=storage)
    orphan = study.ask()  # as a driver killed mid-trial leaves it: running, its job too
    orphan.set_user_attr("job_id", "20260101-000000-dead00")
    folder = ArtifactStore(tmp_path).job("20260101-000000-dead00").create()
    folder.update_status(state="running")
    resumed = tune("--study", "crashy", "--trials", "2", "--local", "--json",
                   "--artifacts-dir", str(tmp_path))
    assert resumed.exit_code == 0, resumed.output
    entry = json.loads(resumed.stdout)["optimizers"]["adam"]
    assert entry["finished_trials"] == 2 and entry["failed_trials"] == 1


def test_a_queued_trial_whose_job_ended_after_its_driver_died_is_counted_once(
        redis_server, labctl_env, tmp_path):
    import optuna

    from labctl.cli.spec_options import to_spec
    from labctl.cli.tune_space import SEARCH_SPACE, spec_values
    from labctl.cli.tune_storage import open_storage, optuna_name
    from labctl.shared.queue import submit_job
    from labctl.shared.testing import WorkerProcess, wait_for

    env = labctl_env(redis_url=redis_server.url)
    with WorkerProcess(redis_server.url, tmp_path / "w.log", queues="cpu", env=env):
        first = tune(*SMALL, "--opt", "adam", "--trials", "1", "--study", "orphan", "--json")
        assert first.exit_code == 0, first.output
        storage = open_storage(local=False, artifacts_root=tmp_path, redis_url=redis_server.url)
        study = optuna.load_study(study_name=optuna_name("orphan", "adam"), storage=storage)
        # A driver that asked a trial, queued its job and died: the job ends unattended.
        trial = study.ask()
        params = {r.name: trial.suggest_float(r.name, r.low, r.high, log=r.log)
                  for r in SEARCH_SPACE}
        spec = to_spec({**study.user_attrs["base"], "optimizer": "adam", **spec_values(params)})
        job_id = submit_job(spec)
        trial.set_user_attr("job_id", job_id)
        records = JobRecords(redis_server.client())
        wait_for(lambda: records.state(job_id) == "succeeded", timeout=120,
                 what="the orphaned trial's job")
        resumed = tune("--study", "orphan", "--trials", "2", "--json")
        assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["optimizers"]["adam"]["finished_trials"] == 2
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(study.trials) == 2 and len(trials) == 2  # adopted, not run again
    adopted = next(t for t in trials if t.number == trial.number)
    rows = ArtifactStore(env["LABCTL_ARTIFACTS_DIR"]).job(job_id).read_metrics()
    assert adopted.value == max(r["test_accuracy"] for r in rows)
    assert len(records.list(limit=100)) == 2  # no third job was queued

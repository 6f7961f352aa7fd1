"""Failures at awkward moments: crashes between two writes, unwritable stores, broken files,
bad URLs, and reading a local job while Redis is down."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.shared.artifacts import ArtifactStore, new_job_id
from labctl.shared.spec import SpecError, build_spec, check_runtime
from labctl.worker import runner as runner_module
from labctl.worker.runner import run_job

TINY = {"model": "numpy-cnn", "dataset": "digits", "epochs": 3, "limit_train": 200,
        "limit_test": 60, "batch_size": 50}


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env)


def test_crash_between_metrics_row_and_checkpoint_keeps_every_epoch_once(tmp_path,
                                                                        monkeypatch):
    store, job_id, spec = ArtifactStore(tmp_path), new_job_id(), build_spec(TINY)
    real_build = runner_module.build_engine

    def engine_that_dies_saving_epoch_2(spec):
        engine = real_build(spec)
        real_save = engine.save_checkpoint

        def save(path, epoch, spec_dict):
            if epoch == 2:
                raise RuntimeError("killed while writing the checkpoint")
            real_save(path, epoch, spec_dict)

        engine.save_checkpoint = save
        return engine

    monkeypatch.setattr(runner_module, "build_engine", engine_that_dies_saving_epoch_2)
    assert run_job(spec, job_id, store).state == "failed"
    monkeypatch.setattr(runner_module, "build_engine", real_build)
    assert run_job(spec, job_id, store).state == "succeeded"
    assert [r["epoch"] for r in store.job(job_id).read_metrics()] == [1, 2, 3]


def test_unwritable_artifact_store_fails_the_job_in_one_line(tmp_path):
    # A worker's store gone bad (a full or read-only volume): the job fails, with the reason.
    # (`labctl run` checks --artifacts-dir first and exits 2: see the test further down.)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    outcome = run_job(build_spec(TINY), new_job_id(), ArtifactStore(blocker / "store"))
    assert outcome.state == "failed" and outcome.failure == "crash"
    assert outcome.error.startswith("cannot write the job folder")
    assert "\n" not in outcome.error


def test_worker_refuses_init_weights_outside_its_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    inside = tmp_path / "data" / "w.pt"
    spec = build_spec({"dataset": "synthetic", "init_weights": "/etc/passwd"})
    with pytest.raises(SpecError, match="init_weights: .* outside"):
        check_runtime(spec, allowed_data_dir=str(tmp_path / "data"))
    check_runtime(build_spec({"dataset": "synthetic", "init_weights": str(inside)}),
                  allowed_data_dir=str(tmp_path / "data"))
    check_runtime(spec)  # labctl run on one's own machine may read any file


def test_init_weights_that_are_not_a_checkpoint_exit_2(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("root:x:0:0:root:/root:/bin/bash\n")
    result = invoke("run", "--model", "resnet50", "--dataset", "synthetic", "--epochs", "1",
                    "--limit-train", "8", "--limit-test", "8", "--num-workers", "0",
                    "--image-size", "32", "--init-weights", str(junk),
                    "--artifacts-dir", str(tmp_path / "art"))
    assert result.exit_code == 2
    assert "not a torch checkpoint" in result.stderr
    assert "Traceback" not in result.output


def test_resume_with_a_corrupt_spec_exits_2(tmp_path):
    job_id = new_job_id()
    folder = ArtifactStore(tmp_path).job(job_id).create()
    folder.spec_path.write_text('{"model": "numpy-cn')
    result = invoke("run", "--resume", job_id, "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_malformed_redis_url_exits_2_without_echoing_it(tmp_path):
    env = {"LABCTL_REDIS_URL": "redis://:S3CRET@127.0.0.1:63x79/0",
           "LABCTL_ARTIFACTS_DIR": str(tmp_path)}
    from labctl.shared.settings import get_settings

    get_settings.cache_clear()
    try:
        result = invoke("list", env=env)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "LABCTL_REDIS_URL" in result.stderr and "S3CRET" not in result.output


def test_local_job_is_readable_while_redis_is_down(tmp_path):
    from labctl.shared.settings import get_settings
    from labctl.shared.testing import free_port

    ran = invoke("run", "--model", "numpy-cnn", "--dataset", "digits", "--epochs", "1",
                 "--limit-train", "100", "--artifacts-dir", str(tmp_path), "--json")
    job_id = json.loads(ran.stdout)["job_id"]
    env = {"LABCTL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "LABCTL_ARTIFACTS_DIR": str(tmp_path)}
    get_settings.cache_clear()
    try:
        status = invoke("status", job_id, "--json", env=env)
        logs = invoke("logs", job_id, env=env)
        missing = invoke("status", new_job_id(), env=env)
    finally:
        get_settings.cache_clear()
    assert status.exit_code == 0 and json.loads(status.stdout)["state"] == "succeeded"
    assert logs.exit_code == 0 and "epoch 1/1" in logs.stdout
    assert missing.exit_code == 69  # not here and no Redis: still the broker's fault


def _finished_job(tmp_path) -> tuple[str, object]:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 2}.items()]
    result = invoke("run", *args, "--artifacts-dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.stdout)["job_id"]
    return job_id, ArtifactStore(tmp_path).job(job_id)


def test_resume_refuses_what_would_not_fit_and_writes_nothing(tmp_path, labctl_env):
    labctl_env(keep_checkpoint=1)  # a succeeded job trains further from a kept checkpoint
    job_id, folder = _finished_job(tmp_path)
    spec_before, status_before = folder.spec_path.read_text(), folder.read_status()
    for flags, message in [(["--dataset", "synthetic"], "dataset: cannot be changed"),
                           (["--opt", "adam"], "optimizer: cannot be changed"),
                           (["--epochs", "1"], "epochs: job " + job_id + " has already "
                                                "trained 2 epochs; resume with --epochs 2")]:
        result = invoke("run", "--resume", job_id, *flags, "--artifacts-dir", str(tmp_path))
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"labctl: {message}" or message in result.stderr
        assert "Traceback" not in result.output
    # The refused attempts left the job as it was: a plain resume still works.
    assert folder.spec_path.read_text() == spec_before
    assert folder.read_status() == status_before
    longer = invoke("run", "--resume", job_id, "--epochs", "3", "--artifacts-dir", str(tmp_path))
    assert longer.exit_code == 0, longer.output
    assert [row["epoch"] for row in folder.read_metrics()] == [1, 2, 3]
    assert folder.read_summary()["epochs"] == 3


def test_resume_with_a_corrupt_status_exits_2(tmp_path):
    job_id, folder = _finished_job(tmp_path)
    folder.status_path.write_text('{"state": ')
    result = invoke("run", "--resume", job_id, "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 2 and f"cannot read {folder.status_path}" in result.stderr


def test_an_artifacts_dir_that_cannot_be_made_exits_2(tmp_path):
    (tmp_path / "a-file").write_text("")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    result = invoke("run", *args, "--artifacts-dir", str(tmp_path / "a-file" / "sub"))
    assert result.exit_code == 2
    assert result.stderr.startswith("labctl: artifacts directory ")
    assert "Traceback" not in result.output


def test_an_error_from_a_dataloader_worker_is_reported_as_its_cause():
    # torch re-raises a worker's exception with the worker's whole traceback as its message.
    from torch._utils import ExceptionWrapper

    from labctl.worker.engine import DataError
    from labctl.worker.runner import one_line

    try:
        raise DataError("cannot decode image 00001.jpg at /data/cars_test")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as raised:
        wrapped.reraise()
    assert "Original Traceback" in str(raised.value)
    assert one_line(raised.value) == "cannot decode image 00001.jpg at /data/cars_test"
    assert one_line(RuntimeError("first\nsecond")) == "first"
    assert one_line(ValueError()) == "ValueError"


def test_an_artifacts_dir_that_is_a_file_exits_2(tmp_path, labctl_env):
    (tmp_path / "a-file").write_text("")
    labctl_env(artifacts_dir=tmp_path / "a-file")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    result = invoke("run", *args)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"labctl: artifacts directory {tmp_path / 'a-file'}: " \
                                    "not a directory"


def test_resume_with_an_empty_id_exits_2(tmp_path):
    result = invoke("run", "--resume", "", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 2 and "job id" in result.stderr.lower()


def test_a_bad_numpy_thread_count_exits_2_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "abc")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    result = invoke("run", *args, "--artifacts-dir", str(tmp_path / "art"))
    assert result.exit_code == 2
    assert "LABCTL_NUMPY_THREADS must be a whole number >= 1, got 'abc'" in result.stderr
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("LABCTL_HEARTBEAT_SECONDS", "abc", "LABCTL_HEARTBEAT_SECONDS: Input should be a valid"),
    ("LABCTL_METRICS_PORT", "99999", "LABCTL_METRICS_PORT: Input should be less than"),
])
@pytest.mark.parametrize("command", [["list"], ["run", "--model", "numpy-cnn"]])
def test_a_bad_setting_is_one_line_and_exit_2(monkeypatch, capsys, variable, value, message,
                                              command):
    # Through the console script's main(): that is where every command's settings error
    # lands, whichever command first reads them (list used to blame LABCTL_REDIS_URL).
    from labctl.cli.main import main
    from labctl.shared.settings import get_settings

    monkeypatch.setenv(variable, value)
    monkeypatch.setattr("sys.argv", ["labctl", *command])
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            main()
    finally:
        get_settings.cache_clear()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"labctl: {message}") and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "start"), [
    (["list", "--limit", "0"], "labctl: Invalid value for '--limit'"),
    (["run", "--nope"], "labctl: No such option '--nope'"),
    (["bogus"], "labctl: No such command 'bogus'"),
])
def test_usage_errors_are_one_line_from_the_console_script(monkeypatch, capsys, argv, start):
    from labctl.cli.main import main

    monkeypatch.setattr("sys.argv", ["labctl", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1 and "--help')" in err

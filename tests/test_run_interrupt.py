"""Ctrl-C during `labctl run`: the job stops cleanly, keeps its checkpoint, is cancelled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from labctl.shared.artifacts import ArtifactStore


def wait_for_first_epoch(root: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for folder in root.glob("*/"):
            if (folder / "metrics.jsonl").exists() and (folder / "checkpoint.npz").exists():
                return folder
        time.sleep(0.1)
    raise AssertionError("no epoch finished in time")


def test_ctrl_c_marks_cancelled_keeps_checkpoint_and_resumes(tmp_path):
    command = [sys.executable, "-m", "labctl.cli.main", "run", "--model", "numpy-cnn",
               "--dataset", "digits", "--epochs", "500", "--artifacts-dir", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = wait_for_first_epoch(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert f"labctl run --resume {folder.name}" in stderr
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "cancelled"
    assert (folder / "checkpoint.npz").exists()
    done = [row["epoch"] for row in ArtifactStore(tmp_path).job(folder.name).read_metrics()]
    assert done == list(range(1, len(done) + 1))
    assert status["run_seconds"] > 0
    # Pretend the first attempt ran an hour, to see that time carried into the summary.
    (folder / "status.json").write_text(json.dumps({**status, "run_seconds": 3600.0}))

    # Resume, and shorten the run so it finishes one epoch after the checkpoint.
    epochs = len(done) + 1
    began = time.monotonic()
    resumed = subprocess.run([*command[:3], "run", "--resume", folder.name, "--epochs",
                              str(epochs), "--artifacts-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {len(done)}" in resumed.stderr
    job = ArtifactStore(tmp_path).job(folder.name)
    assert [row["epoch"] for row in job.read_metrics()] == list(range(1, epochs + 1))
    assert job.read_status()["state"] == "succeeded"
    # The summary counts the time before the interruption too, not only the resumed run.
    assert 3600 < job.read_summary()["total_seconds"] < 3600 + (time.monotonic() - began)


def test_sigterm_cancels_too_instead_of_leaving_the_job_running(tmp_path):
    command = [sys.executable, "-m", "labctl.cli.main", "run", "--model", "numpy-cnn",
               "--dataset", "digits", "--epochs", "500", "--artifacts-dir", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = wait_for_first_epoch(tmp_path, proc)
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "cancelled" and status["epoch"] >= 1
    assert f"checkpoint after epoch {status['epoch']} kept" in stderr

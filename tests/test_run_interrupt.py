"""Ctrl-C during `labctl run`: the job stops cleanly, keeps its checkpoint, is cancelled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.artifacts import ArtifactStore


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
    command = [sys.executable, "-m", "cli.main", "run", "--model", "numpy-cnn",
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

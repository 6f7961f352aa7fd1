"""`labctl run` end to end on the bundled digits: the demo's promise and every artefact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from labctl.cli.main import cli
from labctl.shared.artifacts import ArtifactStore

METRIC_KEYS = {"epoch", "train_loss", "test_loss", "test_accuracy", "test_f1_macro",
               "epoch_seconds", "images_per_second", "lr"}


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_demo_reaches_97_percent_and_leaves_every_artefact(tmp_path):
    # Exactly the flags of `make demo`.
    result = run_cli("run", "--model", "numpy-cnn", "--opt", "adamax", "--dataset", "digits",
                     "--epochs", "10", "--batch-size", "16", "--lr", "5e-3",
                     "--artifacts-dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["final"]["test_accuracy"] >= 0.97
    folder = Path(summary["artifacts"])
    assert folder.parent == tmp_path

    spec = json.loads((folder / "spec.json").read_text())
    assert (spec["model"], spec["optimizer"], spec["epochs"]) == ("numpy-cnn", "adamax", 10)
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "succeeded" and status["error"] is None
    assert status["started_at"] <= status["finished_at"]

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    for row in rows:
        assert METRIC_KEYS <= row.keys()
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["test_f1_macro"] <= 1
        assert row["epoch_seconds"] > 0 and row["images_per_second"] > 0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine schedule by default

    assert summary["num_classes"] == 10
    assert (summary["train_size"], summary["test_size"]) == (1437, 360)
    assert summary["final"]["test_accuracy"] == rows[-1]["test_accuracy"]
    assert summary["best"]["test_accuracy"] == max(r["test_accuracy"] for r in rows)
    best_row = next(r for r in rows if r["epoch"] == summary["best"]["epoch"])
    assert summary["best"]["test_f1_macro"] == best_row["test_f1_macro"]
    assert summary["total_seconds"] > 0
    assert len(summary["per_class_accuracy"]) == 10

    weights = np.load(folder / "model.npz")
    assert all(weights[k].dtype == np.float32 for k in weights.files)
    assert not (folder / "checkpoint.npz").exists()  # dropped on success: model.npz stays
    cm = np.load(folder / "confusion_matrix.npy")
    assert cm.shape == (10, 10) and cm.sum() == 360
    for name in ("loss.png", "accuracy_f1.png", "confusion_matrix.png"):
        with Image.open(folder / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 100
    log_lines = (folder / "log.txt").read_text().splitlines()
    assert sum(line.startswith("epoch ") for line in log_lines) == 10
    assert log_lines[-1].startswith("succeeded: test accuracy ")  # how it ended, for `logs`
    assert "epoch 10/10" in result.stderr


DIVERGING_SPEC = """\
model: numpy-cnn
dataset: digits
optimizer: adam
lr: 1.0
lr_schedule: constant
epochs: 3
# beta2 = 0 makes Adam divide the momentum by the current |gradient|: a dead unit's zero
# gradient (eps 1e-30) turns that into a step of ~1e30 and the loss into NaN.
betas: [0.9, 0.0]
eps: 1.0e-30
"""


def test_failed_job_records_why(tmp_path):
    spec_file = tmp_path / "diverge.yaml"
    spec_file.write_text(DIVERGING_SPEC)
    result = run_cli("run", "-f", str(spec_file), "--artifacts-dir", str(tmp_path / "art"))
    assert result.exit_code == 1
    assert "diverged at epoch" in result.stderr
    store = ArtifactStore(tmp_path / "art")
    (job_id,) = store.job_ids()
    status = store.job(job_id).read_status()
    assert status["state"] == "failed" and "diverged at epoch" in status["error"]


def test_a_loss_that_explodes_but_stays_finite_is_divergence_too(tmp_path):
    # AdaMax at lr 10: the epoch's mean loss is ~1e8, finite, and the job used to "succeed"
    # at chance accuracy.
    result = run_cli("run", "--model", "numpy-cnn", "--dataset", "digits", "--lr", "10",
                     "--epochs", "3", "--limit-train", "256", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "diverged at epoch 1: mean training loss" in result.stderr
    assert "over 100x chance level (2.30)" in result.stderr


def test_divergence_threshold_is_relative_to_chance():
    from labctl.worker.engine import TrainingDiverged, check_not_diverged

    check_not_diverged(2.3, 10, 1)  # a random guess: fine
    check_not_diverged(229.0, 10, 1)  # bad, but not yet 100x ln(10)
    check_not_diverged(500.0, 196, 1)  # 100x ln(196) is 528
    for loss in (231.0, float("nan"), float("inf")):
        with pytest.raises(TrainingDiverged, match="^diverged at epoch 4: "):
            check_not_diverged(loss, 10, 4)


def test_resume_continues_a_finished_prefix(tmp_path, labctl_env):
    labctl_env(keep_checkpoint="true")  # a succeeded job keeps its checkpoint only if asked
    art = str(tmp_path)
    first = run_cli("run", "--model", "numpy-cnn", "--dataset", "digits", "--epochs", "2",
                    "--limit-train", "300", "--artifacts-dir", art, "--json")
    assert first.exit_code == 0, first.output
    job_id = json.loads(first.stdout)["job_id"]
    assert (tmp_path / job_id / "checkpoint.npz").exists()
    again = run_cli("run", "--resume", job_id, "--epochs", "3", "--artifacts-dir", art, "--json")
    assert again.exit_code == 0, again.output
    assert "resuming after epoch 2" in again.stderr
    rows = ArtifactStore(tmp_path).job(job_id).read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3]

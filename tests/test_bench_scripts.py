"""The prepared benchmark scripts at toy sizes: ``scripts/gpu-check --dry-run`` runs every
stage on the CPU, and ``bench.data_path`` writes its table into a benchmarks page."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    docs = REPO / "docs" / "benchmarks.md"
    before = docs.read_text()
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(REPO / "scripts" / "gpu-check"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    log = (out / "gpu-check.log").read_text()
    for stage in ("== machine", "== install", "== cuda tests", "== throughput", "== done"):
        assert stage in log
    assert "dry run: installing nothing" in log
    table = (out / "gpu-check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows[1:]]
    assert labels == [
        "ours: bf16 autocast + channels_last",
        "torchvision: bf16 autocast + channels_last",
        "ours: bf16 autocast + channels_last, torch.compile",
        "torchvision: bf16 autocast + channels_last, torch.compile",
        "decode once into the uint8 cache, copy to the device",
        "data path alone: cached crops/flips/normalise on the device",
        "data path alone: streaming JPEG DataLoader (2 workers)",
        "epoch + evaluation, decode-once path, bf16/CL (the engine's default)",
    ]
    assert "failed" not in table
    assert "train 12 + evaluate 8 images; finite loss: True" in table
    page = (out / "benchmarks.md").read_text()
    assert "<!-- gpu:start -->" in page and "dry run" in page
    assert docs.read_text() == before  # toy numbers never reach the docs


def test_gpu_check_refuses_an_unknown_argument(tmp_path):
    done = subprocess.run([str(REPO / "scripts" / "gpu-check"), "--dryrun"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == "usage: scripts/gpu-check [--dry-run]"


def test_data_path_bench_writes_its_section(tmp_path, torch_one_thread):
    from labctl.bench import data_path

    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n<!-- queue:start -->\nkept\n<!-- queue:end -->\n")
    assert data_path.main(["--images", "8", "--size", "32", "--batch", "4", "--model-batch",
                           "2", "--model-steps", "1", "--workers", "1", "--doc",
                           str(page)]) == 0
    text = page.read_text()
    assert "kept" in text and "<!-- data-path:start -->" in text
    section = text.split("<!-- data-path:start -->")[1]
    for row in ("| decode once into the uint8 cache (shorter side 36) |",
                "| cached + RandomResizedCrop/flip/normalise in batches",
                "| streaming DataLoader, 1 worker (`data_path: stream`)",
                "| ResNet50 training step"):
        assert row in section

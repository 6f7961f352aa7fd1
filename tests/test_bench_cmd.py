"""``labctl bench``: the table is built from the benchmark modules' own measurements."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from labctl.cli.main import cli

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_modules(monkeypatch):
    # An editable install made before bench/ existed does not map it; the checkout does.
    monkeypatch.syspath_prepend(str(REPO))
    from labctl.bench import numpy_vs_torch, resnet_throughput

    return numpy_vs_torch, resnet_throughput


@pytest.fixture
def fake_timings(bench_modules, monkeypatch):
    """Known timings in place of the measurements: what the table must show follows."""
    nvt, rt = bench_modules
    calls = {"cnn": []}
    # (NumPy ms, torch ms) per case, and per thread count (2 = all threads, 1 = one)
    timings = {("a", 2): (20.0, 10.0), ("a", 1): (30.0, 40.0),
               ("b", 2): (300.0, 400.0), ("b", 1): (500.0, 500.0),
               ("c", 2): (45.0, 50.0), ("c", 1): (60.0, 80.0),
               ("d", 2): (100.0, 125.0), ("d", 1): (150.0, 200.0)}

    def cnn_compare(case, threads, budget_s):
        calls["cnn"].append((case.key, threads, budget_s))
        numpy_ms, torch_ms = timings[case.key, threads]
        return {"numpy_ms": numpy_ms, "torch_ms": torch_ms, "ratio": numpy_ms / torch_ms}

    def resnet_measure(memory_format, batch, size, pairs, warmup):
        calls["resnet"] = (batch, size, pairs, warmup)
        return {"ours": 4.0, "torchvision": 5.0, "ratio": 0.8, "steps": 4}

    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "2")
    monkeypatch.setattr(nvt, "compare", cnn_compare)
    monkeypatch.setattr(rt, "measure", resnet_measure)
    return calls


def test_table_has_the_ratios(fake_timings):
    result = runner.invoke(cli, ["bench", "--quick"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["benchmark", "implementation", "device"]
    cnn_a = [line for line in lines if "(a)" in line]
    assert len(cnn_a) == 4  # NumPy and PyTorch, on 2 threads and on 1
    assert "NumPy (ours)" in cnn_a[0] and "cpu, 2 threads" in cnn_a[0]
    assert "20.0" in cnn_a[0] and "1.00x NumPy" in cnn_a[0]
    # torch twice as fast as NumPy: 10 ms/step, 6400 img/s at batch 64, 2.00x
    assert "PyTorch" in cnn_a[1] and "6400" in cnn_a[1] and "2.00x NumPy" in cnn_a[1]
    assert "1 thread (CPU time)" in cnn_a[3] and "0.75x NumPy" in cnn_a[3]
    cnn_b = [line for line in lines if "(b)" in line]
    assert "0.75x NumPy" in cnn_b[1] and "1.00x NumPy" in cnn_b[3]
    cnn_c = [line for line in lines if "(c) lab net" in line]
    assert len(cnn_c) == 4 and "0.90x NumPy" in cnn_c[1] and "0.75x NumPy" in cnn_c[3]
    cnn_d = [line for line in lines if "(d) deep net" in line]
    assert len(cnn_d) == 4 and "0.80x NumPy" in cnn_d[1]
    resnet = [line for line in lines if line.startswith("ResNet50")]
    assert "0.80x torchvision" in resnet[0] and "2000.0" in resnet[0]  # 8 images at 4 img/s
    # --quick asks the modules for the small sizes
    assert fake_timings["cnn"] == [(key, threads, 2.0) for key in "abcd" for threads in (2, 1)]
    assert fake_timings["resnet"] == (8, 64, 2, 1)


def test_json_rows(fake_timings):
    result = runner.invoke(cli, ["bench", "--json"], catch_exceptions=False)
    data = json.loads(result.stdout)
    assert data["quick"] is False and "torch" in data["environment"]
    torch_row = data["rows"][1]
    assert torch_row["implementation"] == "PyTorch" and torch_row["device"] == "cpu, 2 threads"
    assert torch_row["ratio"] == pytest.approx(2.0)
    assert torch_row["images_per_second"] == pytest.approx(6400)
    assert fake_timings["cnn"][0] == ("a", 2, 12.0)  # the full run's budget


@pytest.fixture
def one_thread(monkeypatch):
    """One thread for the real measurement: on a shared machine, torch's OpenMP threads
    spin-wait for each other and a tiny ResNet50 step takes seconds instead of 0.1 s."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "1")  # bench.numpy_vs_torch sets torch's too
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_real_modules_at_a_tiny_size(bench_modules, one_thread, monkeypatch):
    """The adapters against the modules' real signatures and results (not their speed)."""
    from labctl.cli.analysis.benchmarks import run_benchmarks

    nvt, _ = bench_modules
    monkeypatch.setattr(nvt, "CASES", [nvt.Case("t", 1, 8, 4, 3)])  # a tiny network
    sizes = {"cnn_budget_s": 0.0, "resnet_size": 32, "resnet_batch": 2, "resnet_pairs": 1,
             "resnet_warmup": 1}
    rows = run_benchmarks(sizes=sizes, cuda=False)
    assert [(r.implementation, r.device) for r in rows] == [
        ("NumPy (ours)", "cpu, 1 thread"), ("PyTorch", "cpu, 1 thread"),
        ("ours", "cpu, 1 thread"), ("torchvision", "cpu, 1 thread")]
    assert all(r.ms_per_step > 0 and r.images_per_second > 0 for r in rows)


def test_report_bench_includes_the_measured_table(fake_timings, tmp_path):
    from test_compare import job_id, make_run

    from labctl.cli.analysis.manifest import write_manifest

    root = tmp_path / "artifacts"
    for seed in range(2):
        make_run(root, job_id(2 * seed), optimizer="adam", seed=seed)
        make_run(root, job_id(2 * seed + 1), optimizer="adamax", seed=seed)
    write_manifest(root, "sw-b", mode="local", base={}, grid={},
                   jobs=[{"job_id": job_id(i), "params": {}} for i in range(4)])
    out = tmp_path / "report"
    result = runner.invoke(cli, ["report", "sw-b", "--artifacts-dir", str(root), "-o", str(out),
                                 "--bench"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "Benchmarks measured for this report" in text and "2.00x NumPy" in text


def test_missing_bench_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "labctl.bench", None)
    result = runner.invoke(cli, ["bench", "--quick"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "pip install -e ." in result.stderr and "Traceback" not in result.output


def test_numpy_bench_reports_where_two_threads_lose_time(bench_modules, monkeypatch):
    """The multi-threaded section comes from a real measurement: CPU and wall time at both
    thread counts for each case, and the small-call cost at both."""
    nvt, _ = bench_modules
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "2")
    monkeypatch.setattr(nvt, "CASES", [nvt.Case("t", 1, 8, 4, 3)])
    monkeypatch.setattr(nvt, "SCALING_BLOCKS", 2)
    monkeypatch.setattr(nvt, "SPLIT_SECONDS", 0.05)
    result = nvt.measure(budget_s=0.0, profile_repeats=1)
    scaling = result["cases"][0]["scaling"]
    assert set(scaling) == {"1", "2"}
    assert all(v["cpu_ms"] > 0 and v["wall_ms"] > 0 for v in scaling.values())
    assert set(result["small_op_us"]) == {"1", "2"}
    # Two real processes trained half the batch each: their step time is the threads' bound.
    split = result["cases"][0]["split_ms"]
    assert split > 0
    text = nvt.render(result, None)
    assert "### Where the time goes with 2 threads" in text
    row = next(line for line in text.splitlines() if line.startswith("| (t)") and "ms |" in line)
    assert f"{scaling['2']['cpu_ms']:.1f}" in row and f"{scaling['1']['cpu_ms']:.1f}" in row
    assert row.endswith(f"| {split:.1f} |")
    assert "2 processes, 1/2 of the batch each" in text
    # The OPENBLAS_CORETYPE-removed column appears only with a second run to fill it.
    assert "OPENBLAS_CORETYPE removed" not in text
    assert "OPENBLAS_CORETYPE removed" in nvt.render(result, result)
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    assert nvt.run_without_coretype(None) is None  # nothing to remove: no second run

"""Medians with bootstrap intervals, time to target, Holm's correction and the box plot of
``labctl compare``, on hand-built runs whose numbers we chose."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from test_compare import compare, compare_json, job_id, make_run

from labctl.cli.analysis.robust import BOOTSTRAP_RESAMPLES, MedianCI, epochs_to_target, holm


def test_holm_matches_the_step_down_formula():
    # Sorted p: 0.01, 0.02, 0.04 -> 3*0.01, max(that, 2*0.02), max(that, 1*0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # An untested figure (None) is not in the family: m is 2 here, not 3.
    assert holm([0.02, None, 0.03]) == [pytest.approx(0.04), None, pytest.approx(0.04)]
    assert holm([0.001]) == [0.001]


def test_median_and_bootstrap_interval():
    values = [0.90, 0.91, 0.92, 0.93, 0.99, 0.80, 0.95, 0.94, 0.92, 0.91]
    figure = MedianCI(values)
    assert figure.median == pytest.approx(np.median(values))
    assert min(values) <= figure.low <= figure.median <= figure.high <= max(values)
    # The interval is of bootstrap medians: an independent resampling agrees closely.
    rng = np.random.default_rng(1)
    medians = np.median(rng.choice(values, (BOOTSTRAP_RESAMPLES, len(values))), axis=1)
    assert figure.low == pytest.approx(np.quantile(medians, 0.025), abs=0.006)
    assert figure.high == pytest.approx(np.quantile(medians, 0.975), abs=0.006)
    assert MedianCI(values).low == figure.low  # seeded: the same runs, the same interval


def test_misses_count_as_never_in_the_median():
    assert epochs_to_target([{"epoch": 1, "test_accuracy": 0.5}], 0.9) == math.inf
    mostly_missed = MedianCI([2.0, math.inf, math.inf])
    assert math.isinf(mostly_missed.median)
    dumped = mostly_missed.as_dict()
    assert dumped["median"] is None and "median" in dumped["never"]
    assert MedianCI([2.0, 3.0, math.inf]).median == 3.0


def tuned_runs(root, model="numpy-cnn", adamax_shift=0.02, seeds=8):
    """adam reaches 0.95 at epoch 3 or never; adamax at epoch 2, ``adamax_shift`` better."""
    for seed in range(seeds):
        base = 0.90 + 0.01 * (seed % 4)
        make_run(root, job_id(1000 * (model == "resnet50") + 10 * seed), model=model,
                 optimizer="adam", seed=seed, lr=1e-3,
                 accuracies=(0.5, 0.9, base + 0.05 if seed % 2 else base))
        make_run(root, job_id(1000 * (model == "resnet50") + 10 * seed + 1), model=model,
                 optimizer="adamax", seed=seed, lr=4e-3,
                 accuracies=(0.6, 0.96, base + adamax_shift + 0.05))


def test_compare_reports_medians_intervals_and_the_wilcoxon_of_time_to_target(tmp_path):
    tuned_runs(tmp_path)
    (block,) = compare_json(tmp_path, str(tmp_path))["blocks"]  # lr goes with the optimizer
    robust = block["robust"]
    assert robust["target"] == 0.95
    adam, adamax = robust["groups"]["adam"], robust["groups"]["adamax"]
    adam_final = [0.90 + 0.01 * (s % 4) + (0.05 if s % 2 else 0) for s in range(8)]
    assert adam["final_accuracy"]["median"] == pytest.approx(np.median(adam_final))
    assert adam["reached"] == 4 and adamax["reached"] == 8
    assert adamax["epochs_to_target"]["median"] == 2.0
    time_test = next(t for t in robust["tests"] if t["figure"] == "epochs_to_target")
    # A miss stands as epoch 4 (one past the last) in the pairs.
    assert time_test["a_values"] == [4.0 if s % 2 == 0 else 3.0 for s in range(8)]
    expected = stats.wilcoxon(np.subtract(time_test["b_values"], time_test["a_values"]))
    assert time_test["wilcoxon"]["p_value"] == pytest.approx(expected.pvalue)
    assert time_test["holm"]["p_value"] is None  # one workload: nothing to correct


def test_holm_corrects_over_several_workloads(tmp_path):
    tuned_runs(tmp_path, "numpy-cnn")
    tuned_runs(tmp_path, "resnet50", adamax_shift=0.0)
    data = compare_json(tmp_path, str(tmp_path))
    assert len(data["blocks"]) == 2
    tests = [next(t for t in b["robust"]["tests"] if t["figure"] == "final_accuracy")
             for b in data["blocks"]]
    raw = [t["wilcoxon"]["p_value"] for t in tests]
    assert [t["holm"]["p_value"] for t in tests] == pytest.approx(holm(raw))
    assert all(t["holm"]["family_size"] == 2 for t in tests)
    text = compare(str(tmp_path), "--artifacts-dir", str(tmp_path)).stdout
    assert "Holm over 2 workloads" in text
    assert "median [95% bootstrap CI] across seeds" in text


def test_box_plot_is_written(tmp_path):
    tuned_runs(tmp_path)
    out = tmp_path / "box.png"
    result = compare(str(tmp_path), "--artifacts-dir", str(tmp_path), "--box", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = compare(str(tmp_path), "--artifacts-dir", str(tmp_path), "--box",
                  str(tmp_path / "box.nope"))
    assert bad.exit_code == 2 and bad.stderr.startswith("labctl: --box")

"""``labctl compare`` on hand-built artefact folders whose numbers we chose, so every figure
and test statistic can be checked against an independent computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from labctl.cli.analysis.manifest import write_manifest
from labctl.cli.analysis.stats import epochs_to_fraction
from labctl.cli.analysis.tables import format_seeds
from labctl.cli.main import cli
from labctl.shared.artifacts import ArtifactStore, write_json

runner = CliRunner()

ADAM = [0.900, 0.920, 0.910]
ADAMAX = [0.930, 0.935, 0.925]


def make_run(root, job_id, *, optimizer="adam", seed=0, accuracies=(0.5, 0.8, 0.9),
             f1s=None, state="succeeded", model="numpy-cnn", sweep_id=None, seconds=2.0,
             **spec_fields):
    """A job folder as the runner leaves it, with the metrics we choose."""
    folder = ArtifactStore(root).job(job_id).create()
    f1s = list(f1s) if f1s is not None else [a - 0.05 for a in accuracies]
    spec = {"model": model, "optimizer": optimizer, "dataset": "digits", "seed": seed,
            "epochs": len(accuracies), "sweep_id": sweep_id, "device": "cpu", **spec_fields}
    write_json(folder.spec_path, spec)
    for epoch, (acc, f1) in enumerate(zip(accuracies, f1s, strict=True), start=1):
        folder.append_metrics({"epoch": epoch, "train_loss": 1.0 / epoch, "test_loss": 1.2 / epoch,
                               "test_accuracy": acc, "test_f1_macro": f1,
                               "epoch_seconds": seconds, "images_per_second": 100 / seconds,
                               "lr": 1e-3})
    folder.update_status(state=state)
    if state == "succeeded":
        write_json(folder.summary_path, {"job_id": job_id, "train_size": 100, "test_size": 50,
                                         "per_class_accuracy": {"0": 1.0, "1": 0.5}})
        np.save(folder.path / "confusion_matrix.npy", np.array([[5, 0], [2, 3]]))
    return folder


def job_id(n: int) -> str:
    return f"20261128-000000-{n:06x}"


@pytest.fixture
def optimizer_sweep(tmp_path):
    """3 seeds x adam/adamax: final accuracies ADAM / ADAMAX; a manifest names the sweep."""
    root = tmp_path / "artifacts"
    jobs = []
    for seed in range(3):
        for k, (opt, finals) in enumerate((("adam", ADAM), ("adamax", ADAMAX))):
            jid = job_id(10 * seed + k)
            make_run(root, jid, optimizer=opt, seed=seed, sweep_id="sw-test",
                     accuracies=(0.5, finals[seed] + 0.01, finals[seed]),
                     f1s=(0.4, finals[seed] - 0.02, finals[seed] - 0.03))
            jobs.append({"job_id": jid, "params": {"seed": seed, "optimizer": opt}})
    write_manifest(root, "sw-test", mode="local", base={"model": "numpy-cnn"},
                   grid={"seed": [0, 1, 2], "optimizer": ["adam", "adamax"]}, jobs=jobs)
    return root


def compare(*args):
    return runner.invoke(cli, ["compare", *args], catch_exceptions=False)


def compare_json(root, *refs, by=None):
    args = [*refs, "--artifacts-dir", str(root), "--json"] + (["--by", by] if by else [])
    result = compare(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_paired_t_test_matches_scipy_and_the_formula(optimizer_sweep):
    data = compare_json(optimizer_sweep, "sw-test")
    (block,) = data["blocks"]
    test = next(t for t in block["tests"] if t["figure"] == "final_accuracy")
    expected = stats.ttest_rel(ADAMAX, ADAM)
    # The textbook statistic, computed without scipy: mean(d) / (sd(d) / sqrt(n)).
    d = np.subtract(ADAMAX, ADAM)
    t_by_hand = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    p_by_hand = 2 * stats.t.sf(abs(t_by_hand), df=len(d) - 1)
    assert test["t_test"]["statistic"] == pytest.approx(expected.statistic, rel=1e-12)
    assert test["t_test"]["statistic"] == pytest.approx(t_by_hand, rel=1e-9)
    assert test["t_test"]["p_value"] == pytest.approx(p_by_hand, rel=1e-9)
    assert test["difference"] == "adamax - adam"
    assert test["n_pairs"] == 3 and test["seeds"] == [0, 1, 2]
    assert test["mean_diff"] == pytest.approx(d.mean())
    assert test["tests_used"] == ["paired t-test"]
    assert test["significant"] == (expected.pvalue < 0.05)
    # 3 pairs: the Wilcoxon is skipped, and the reason says so.
    assert test["wilcoxon"]["p_value"] is None
    assert "at least 6" in test["wilcoxon"]["note"]


def test_mean_std_and_epochs_to_95(optimizer_sweep):
    data = compare_json(optimizer_sweep, "sw-test")
    groups = {g["value"]: g for g in data["blocks"][0]["groups"]}
    final = groups["adam"]["figures"]["final_accuracy"]
    assert final["mean"] == pytest.approx(np.mean(ADAM))
    assert final["std"] == pytest.approx(np.std(ADAM, ddof=1))
    best = groups["adamax"]["figures"]["best_accuracy"]
    assert best["mean"] == pytest.approx(np.mean(ADAMAX) + 0.01)
    # Curves (0.5, x+0.01, x): epoch 2 is the best and already >= 95% of it.
    assert groups["adam"]["figures"]["epochs_to_95"]["values"] == [2, 2, 2]
    assert groups["adamax"]["figures"]["images_per_second"]["mean"] == pytest.approx(50.0)


def test_epochs_to_95_is_the_first_epoch_within_5_percent_of_the_best():
    rows = [{"epoch": e, "test_accuracy": a} for e, a in enumerate([0.5, 0.8, 0.96, 1.0, 0.97], 1)]
    assert epochs_to_fraction(rows) == 3
    assert epochs_to_fraction(rows, fraction=1.0) == 4
    assert epochs_to_fraction([]) is None


def test_seed_lists_are_folded_into_ranges():
    assert format_seeds(list(range(10))) == "0-9"
    assert format_seeds([7, 0, 1, 2, 3]) == "0-3,7"
    assert format_seeds([0, 1]) == "0,1"


def test_wilcoxon_runs_from_six_pairs(tmp_path):
    adam = [0.80, 0.82, 0.79, 0.85, 0.81, 0.83]
    adamax = [0.84, 0.83, 0.85, 0.86, 0.80, 0.88]
    for seed in range(6):
        make_run(tmp_path, job_id(2 * seed), optimizer="adam", seed=seed,
                 accuracies=(0.5, adam[seed]))
        make_run(tmp_path, job_id(2 * seed + 1), optimizer="adamax", seed=seed,
                 accuracies=(0.5, adamax[seed]))
    data = compare_json(tmp_path, str(tmp_path))  # a folder of job folders
    test = data["blocks"][0]["tests"][0]
    expected = stats.wilcoxon(adamax, adam)
    assert test["tests_used"] == ["paired t-test", "Wilcoxon signed-rank"]
    assert test["wilcoxon"]["statistic"] == pytest.approx(expected.statistic)
    assert test["wilcoxon"]["p_value"] == pytest.approx(expected.pvalue)
    assert test["t_test"]["p_value"] == pytest.approx(stats.ttest_rel(adamax, adam).pvalue)


def test_pairs_are_matched_by_seed_and_unpaired_seeds_dropped(tmp_path):
    # adam ran seeds 0-2, adamax seeds 1-3: only seeds 1 and 2 pair, whatever the order.
    adam = {0: 0.70, 1: 0.80, 2: 0.90}
    adamax = {1: 0.85, 2: 0.91, 3: 0.99}
    for n, (seed, acc) in enumerate(adam.items()):
        make_run(tmp_path, job_id(n), optimizer="adam", seed=seed, accuracies=(acc,))
    for n, (seed, acc) in enumerate(reversed(adamax.items())):
        make_run(tmp_path, job_id(10 + n), optimizer="adamax", seed=seed, accuracies=(acc,))
    test = compare_json(tmp_path, str(tmp_path))["blocks"][0]["tests"][0]
    assert test["seeds"] == [1, 2]
    assert test["a_values"] == [0.80, 0.90] and test["b_values"] == [0.85, 0.91]
    expected = stats.ttest_rel([0.85, 0.91], [0.80, 0.90])
    assert test["t_test"]["statistic"] == pytest.approx(expected.statistic)


def test_too_few_pairs_and_zero_variance_say_why(tmp_path):
    make_run(tmp_path, job_id(1), optimizer="adam", seed=0, accuracies=(0.8,))
    make_run(tmp_path, job_id(2), optimizer="adamax", seed=0, accuracies=(0.9,))
    test = compare_json(tmp_path, job_id(1), job_id(2))["blocks"][0]["tests"][0]
    assert test["t_test"]["p_value"] is None and "at least 2" in test["t_test"]["note"]
    assert test["significant"] is None

    make_run(tmp_path, job_id(3), optimizer="adam", seed=1, accuracies=(0.7,))
    make_run(tmp_path, job_id(4), optimizer="adamax", seed=1, accuracies=(0.8,))
    test = compare_json(tmp_path, str(tmp_path))["blocks"][0]["tests"][0]
    assert test["t_test"]["p_value"] is None and "zero variance" in test["t_test"]["note"]


def test_text_table_names_the_test_and_p_value(optimizer_sweep):
    result = compare("sw-test", "--artifacts-dir", str(optimizer_sweep))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "final acc" in out and "epochs to 95% of best acc" in out
    mean, std = np.mean(ADAM), np.std(ADAM, ddof=1)
    assert f"{mean:.4f} ± {std:.4f}" in out
    p = stats.ttest_rel(ADAMAX, ADAM).pvalue
    assert "paired t-test" in out and f"p = {p:.3g}" in out
    assert "Wilcoxon signed-rank: not run" in out


def test_sweep_found_by_spec_tag_without_manifest(optimizer_sweep):
    (optimizer_sweep / "sweeps" / "sw-test.json").unlink()
    data = compare_json(optimizer_sweep, "sw-test")
    assert sum(len(g["job_ids"]) for g in data["blocks"][0]["groups"]) == 6


def test_other_differing_fields_split_blocks(tmp_path):
    for seed in range(2):
        for n, (model, opt) in enumerate([("numpy-cnn", "adam"), ("numpy-cnn", "adamax"),
                                          ("resnet50", "adam"), ("resnet50", "adamax")]):
            make_run(tmp_path, job_id(10 * seed + n), model=model, optimizer=opt, seed=seed)
    data = compare_json(tmp_path, str(tmp_path))
    assert [b["label"] for b in data["blocks"]] == ["numpy-cnn on digits", "resnet50 on digits"]
    assert all(len(b["groups"]) == 2 and len(b["tests"]) == 2 for b in data["blocks"])
    # --by model instead: optimizer becomes the block, models are compared.
    data = compare_json(tmp_path, str(tmp_path), by="model")
    assert [g["value"] for g in data["blocks"][0]["groups"]] == ["numpy-cnn", "resnet50"]
    # The compared field is not one run's value: the label names every model compared.
    assert [b["label"] for b in data["blocks"]] == [
        "numpy-cnn vs resnet50 on digits (adam)", "numpy-cnn vs resnet50 on digits (adamax)"]


def test_every_setup_is_labelled_by_what_differs(tmp_path):
    # Three learning rates: each of the three blocks must name its own, the last included.
    n = 0
    for lr in (1e-3, 2e-3, 3e-3):
        for seed in range(2):
            for opt in ("adam", "adamax"):
                make_run(tmp_path, job_id(n), optimizer=opt, seed=seed, lr=lr)
                n += 1
    data = compare_json(tmp_path, str(tmp_path))
    assert [b["label"] for b in data["blocks"]] == [
        "numpy-cnn on digits (lr=0.001)", "numpy-cnn on digits (lr=0.002)",
        "numpy-cnn on digits (lr=0.003)"]
    assert [b["fields"] for b in data["blocks"]] == [{"lr": 1e-3}, {"lr": 2e-3}, {"lr": 3e-3}]
    text = compare(str(tmp_path), "--artifacts-dir", str(tmp_path)).stdout
    assert "numpy-cnn on digits (lr=0.003): significance" in text


def test_labels_name_every_differing_field_in_spec_order(tmp_path):
    setups = [("numpy-cnn", 1e-3, 32), ("numpy-cnn", 2e-3, 32), ("numpy-cnn", 2e-3, 64),
              ("resnet50", 1e-3, 32)]
    for n, (model, lr, batch) in enumerate(setups):
        for k, opt in enumerate(("adam", "adamax")):
            make_run(tmp_path, job_id(10 * n + k), model=model, optimizer=opt, lr=lr,
                     batch_size=batch)
    labels = [b["label"] for b in compare_json(tmp_path, str(tmp_path))["blocks"]]
    assert labels == ["numpy-cnn on digits (batch_size=32, lr=0.001)",
                      "numpy-cnn on digits (batch_size=32, lr=0.002)",
                      "numpy-cnn on digits (batch_size=64, lr=0.002)",
                      "resnet50 on digits"]
    assert len(set(labels)) == len(labels)


def test_unfinished_runs_are_skipped_with_a_note(optimizer_sweep):
    make_run(optimizer_sweep, job_id(99), state="running", accuracies=(0.1,))
    result = compare(job_id(99), "sw-test", "--artifacts-dir", str(optimizer_sweep))
    assert result.exit_code == 0
    assert f"skipped {job_id(99)}: running after 1 epoch(s)" in result.stderr


def damage_spec(folder):
    folder.spec_path.write_text('{"model": "numpy-cnn", "optim')  # torn mid-write


def drop_throughput(folder):
    rows = [json.loads(line) for line in folder.metrics_path.read_text().splitlines()]
    del rows[-1]["images_per_second"]
    folder.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("damage, reason", [
    (damage_spec, "spec.json is not valid JSON"),
    (drop_throughput, "metrics.jsonl epoch 3 has no images_per_second"),
])
def test_a_damaged_run_is_skipped_with_its_reason(optimizer_sweep, damage, reason):
    damage(ArtifactStore(optimizer_sweep).job(job_id(21)))  # seed 2, adamax
    result = compare("sw-test", "--artifacts-dir", str(optimizer_sweep), "--json")
    assert result.exit_code == 0, result.output
    assert f"labctl: skipped {job_id(21)}: damaged, {reason}" in result.stderr.splitlines()
    groups = {g["value"]: g for g in json.loads(result.stdout)["blocks"][0]["groups"]}
    assert groups["adam"]["seeds"] == [0, 1, 2] and groups["adamax"]["seeds"] == [0, 1]


@pytest.mark.parametrize("damage", [damage_spec, drop_throughput])
def test_only_damaged_runs_exit_1_without_a_traceback(tmp_path, damage):
    damage(make_run(tmp_path, job_id(1)))
    result = compare(job_id(1), "--artifacts-dir", str(tmp_path))  # a traceback would raise
    assert result.exit_code == 1
    assert result.stderr.startswith(f"labctl: no finished runs to compare ({job_id(1)}: damaged")
    assert result.stdout == ""


def test_damaged_spec_does_not_hide_a_sweep_found_by_tag(optimizer_sweep):
    (optimizer_sweep / "sweeps" / "sw-test.json").unlink()
    damage_spec(ArtifactStore(optimizer_sweep).job(job_id(21)))
    result = compare("sw-test", "--artifacts-dir", str(optimizer_sweep), "--json")
    assert result.exit_code == 0, result.output
    assert sum(len(g["job_ids"]) for g in json.loads(result.stdout)["blocks"][0]["groups"]) == 5
    # Its sweep cannot be read, but the user should hear of a run that may be missing.
    assert f"skipped {job_id(21)}: damaged, spec.json is not valid JSON" in result.stderr


def test_unknown_refs_exit_3_and_bad_by_exits_2(optimizer_sweep):
    for ref in ("20990101-000000-abcdef", "sw-nope", "../etc"):
        result = compare(ref, "--artifacts-dir", str(optimizer_sweep))
        assert result.exit_code == 3, result.output
        assert result.stderr.startswith("labctl: no job, sweep or run folder")
        assert result.stdout == ""
    result = compare("sw-test", "--artifacts-dir", str(optimizer_sweep), "--by", "colour")
    assert result.exit_code == 2 and "unknown spec field 'colour'" in result.stderr


def test_nothing_finished_exits_1(tmp_path):
    make_run(tmp_path, job_id(1), state="failed")
    result = compare(job_id(1), "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 1 and "no finished runs" in result.stderr


def test_png_of_overlaid_curves(optimizer_sweep, tmp_path):
    out = tmp_path / "curves.png"
    result = compare("sw-test", "--artifacts-dir", str(optimizer_sweep), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_language_conclusion(optimizer_sweep, tmp_path):
    from labctl.cli.analysis.conclusions import block_conclusion
    from labctl.cli.analysis.pipeline import analyse

    analysis = analyse(["sw-test"], optimizer_sweep)
    text = block_conclusion(analysis.blocks[0], analysis.tests[0])
    expected = stats.ttest_rel(ADAMAX, ADAM)
    gap = (np.mean(ADAMAX) - np.mean(ADAM)) * 100
    assert text.startswith(f"AdaMax ended {gap:.2f} accuracy points above Adam")
    verdict = "significant" if expected.pvalue < 0.05 else "not significant"
    assert f"p = {expected.pvalue:.3g}: {verdict} at 0.05" in text
    assert "still improving" not in text  # the fixture's best epoch is not the last

    for seed in range(2):  # accuracy rising to the end in every run
        make_run(tmp_path, job_id(2 * seed), optimizer="adam", seed=seed,
                 accuracies=(0.2, 0.4 + seed / 10))
        make_run(tmp_path, job_id(2 * seed + 1), optimizer="adamax", seed=seed,
                 accuracies=(0.2, 0.5 + seed / 20))
    analysis = analyse([str(tmp_path)], tmp_path)
    assert "still improving at its last epoch" in block_conclusion(analysis.blocks[0],
                                                                   analysis.tests[0])


def test_unwritable_plot_path_exits_2(optimizer_sweep, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = compare("sw-test", "--artifacts-dir", str(optimizer_sweep),
                     "-o", str(blocker / "curves.png"))
    assert result.exit_code == 2
    assert "cannot write" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("manifest", ['{"jobs": 5}', "[1]", '{"jobs": [tor'])
def test_a_damaged_manifest_falls_back_to_the_runs_sweep_ids(optimizer_sweep, manifest):
    (optimizer_sweep / "sweeps" / "sw-test.json").write_text(manifest)
    result = compare("sw-test", "--artifacts-dir", str(optimizer_sweep), "--json")
    assert result.exit_code == 0, result.output
    assert sum(len(g["job_ids"]) for g in json.loads(result.stdout)["blocks"][0]["groups"]) == 6
    assert "sweep manifest of sw-test: damaged" in result.stderr


def test_a_damaged_manifest_with_no_runs_says_so(tmp_path):
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "sw-gone.json").write_text('{"jobs": 5}')
    result = compare("sw-gone", "--artifacts-dir", str(tmp_path))
    assert result.exit_code == 3
    assert result.stderr.strip() == (f"labctl: sweep sw-gone: its manifest is damaged and no "
                                     f"run under {tmp_path} carries its id")

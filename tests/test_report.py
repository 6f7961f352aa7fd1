"""``labctl report`` on artefacts of real short runs (a local sweep of the NumPy CNN)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from labctl.cli.main import cli

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory):
    """(artefacts root, sweep id): numpy-cnn, adam/adamax x seeds 0-1, 2 epochs each."""
    root = tmp_path_factory.mktemp("artifacts")
    result = invoke("sweep", "--model", "numpy-cnn", "--dataset", "digits", "--epochs", "2",
                    "--limit-train", "300", "--limit-test", "100", "--batch-size", "32",
                    "--opt", "adam,adamax", "--seeds", "2", "--local",
                    "--artifacts-dir", str(root))
    assert result.exit_code == 0, result.output
    return root, result.stdout.split()[0]


def test_report_references_pngs_that_exist(sweep_runs, tmp_path):
    root, sweep_id = sweep_runs
    out = tmp_path / "report"
    result = invoke("report", sweep_id, "--artifacts-dir", str(root), "-o", str(out),
                    "--benchmarks", str(tmp_path / "absent.md"))
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"loss.png", "accuracy.png", "f1.png"} <= set(images)
    assert any(name.startswith("confusion_") for name in images)
    for name in images:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    # stdout lists exactly the files written
    assert sorted(result.stdout.split()) == sorted(str(out / n) for n in [*images, "report.md"])


def test_report_has_the_table_test_conclusion_and_environment(sweep_runs, tmp_path):
    root, sweep_id = sweep_runs
    out = tmp_path / "report"
    invoke("report", sweep_id, "--artifacts-dir", str(root), "-o", str(out))
    text = (out / "report.md").read_text()
    # the comparison table, as Markdown, with mean ± std over the 2 seeds
    assert "| optimizer | seeds | final acc | best acc | final F1 | best F1 |" in text
    assert re.search(r"\| adamax \| 2 \(0,1\) \| \d\.\d{4} ± \d\.\d{4} \|", text)
    # the significance test is named, with its p-value, and the verdict is in plain words
    assert "paired t-test" in text
    assert re.search(r"p = \d", text) or "not defined" in text
    assert "## Conclusion" in text and "significant at 0.05" in text
    # speed, environment, reproduce
    assert "## Speed" in text and "img/s" in text
    import numpy
    import torch

    assert f"NumPy: {numpy.__version__}" in text and f"PyTorch: {torch.__version__}" in text
    assert "CPU:" in text and "Device:" in text
    assert f"labctl report {sweep_id}" in text
    # (a recorded thread setting such as OPENBLAS_NUM_THREADS=1 may precede the command)
    sweep_line = next(line for line in text.splitlines()
                      if "labctl sweep --model numpy-cnn" in line)
    assert "--opt adam,adamax" in sweep_line and "--seeds 2" in sweep_line  # from the manifest
    assert "--dataset stanford-cars --data-root /data/stanford_cars" in text


def test_report_includes_benchmark_figures_when_present(sweep_runs, tmp_path):
    root, sweep_id = sweep_runs
    bench = tmp_path / "benchmarks.md"
    bench.write_text("# Benchmarks\n\n<!-- resnet:start -->\n## ResNet50 throughput\n\n"
                     "| format | img/s |\n| --- | ---: |\n| NCHW | 12.5 |\n"
                     "<!-- resnet:end -->\n")
    out = tmp_path / "report"
    result = invoke("report", sweep_id, "--artifacts-dir", str(root), "-o", str(out),
                    "--benchmarks", str(bench))
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert f"### From `{bench}`" in text
    assert "#### ResNet50 throughput" in text and "| NCHW | 12.5 |" in text
    assert "<!--" not in text


def test_report_of_unknown_sweep_exits_3(tmp_path):
    result = invoke("report", "sw-nothing-here", "--artifacts-dir", str(tmp_path),
                    "-o", str(tmp_path / "out"))
    assert result.exit_code == 3
    assert not (tmp_path / "out").exists()


def test_report_names_every_setup_and_survives_a_torn_confusion_matrix(tmp_path):
    from test_compare import job_id, make_run

    root = tmp_path / "artifacts"
    n = 0
    for lr in (1e-3, 2e-3, 3e-3):
        for seed in range(2):
            for opt in ("adam", "adamax"):
                folder = make_run(root, job_id(n), optimizer=opt, seed=seed, lr=lr)
                if lr == 3e-3:
                    (folder.path / "confusion_matrix.npy").write_bytes(b"\x93NUMPY torn")
                n += 1
    out = tmp_path / "report"
    result = invoke("report", str(root), "--artifacts-dir", str(root), "-o", str(out),
                    "--benchmarks", str(tmp_path / "absent.md"))
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    for lr in ("0.001", "0.002", "0.003"):
        assert f"**numpy-cnn on digits (lr={lr}).**" in text  # its conclusion
    images = re.findall(r"!\[confusion matrix\]\(([^)]+)\)", text)
    assert images == ["confusion_numpy-cnn-on-digits--lr-0.001-.png",
                      "confusion_numpy-cnn-on-digits--lr-0.002-.png"]
    assert "has an unreadable confusion_matrix.npy" in text


def test_a_benchmarks_file_that_is_not_text_is_left_out(sweep_runs, tmp_path):
    root, sweep_id = sweep_runs
    binary = tmp_path / "bin.md"
    binary.write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(cli, ["report", sweep_id, "--artifacts-dir", str(root), "-o",
                                 str(tmp_path / "r"), "--benchmarks", str(binary)])
    assert result.exit_code == 0, result.output
    assert "From `" not in (tmp_path / "r" / "report.md").read_text()


def test_confusion_rows_are_named_in_label_order_not_sorted_order():
    from labctl.cli.analysis.report_writer import confusion_class_names

    # As summary.json stores them: class_names in label order, per_class_accuracy's keys
    # sorted (json.dumps(sort_keys=True)).
    summary = {"class_names": ["Volvo 240", "Audi S4", "BMW M3"],
               "per_class_accuracy": {"Audi S4": 1.0, "BMW M3": 0.5, "Volvo 240": 0.0}}
    assert confusion_class_names(summary, 3) == ["Volvo 240", "Audi S4", "BMW M3"]
    older = {"per_class_accuracy": {"0": 1.0, "1": 0.5}}
    assert confusion_class_names(older, 2) == ["0", "1"]
    assert confusion_class_names(summary, 4) == ["0", "1", "2", "3"]  # mismatch: indices

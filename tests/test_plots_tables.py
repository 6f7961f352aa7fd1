"""Plots and tables a user reads: both score lines visible, counts in the confusion matrix,
no marker smear, images in the format their name says, tables that fit the terminal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_compare import job_id, make_run

from labctl.cli.analysis.manifest import write_manifest
from labctl.cli.analysis.tables import render_text
from labctl.cli.main import cli
from labctl.worker import plots


def rows(n: int) -> list[dict]:
    """``n`` epochs whose accuracy and macro-F1 are equal (a balanced test set)."""
    return [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.1 / e,
             "test_accuracy": 0.5 + e / (4 * n), "test_f1_macro": 0.5 + e / (4 * n)}
            for e in range(1, n + 1)]


def test_accuracy_and_f1_both_show_when_they_coincide():
    fig = plots.scores_figure(rows(10))
    accuracy, f1 = fig.axes[0].get_lines()[:2]
    assert np.array_equal(accuracy.get_ydata(), f1.get_ydata())  # the case at hand
    assert accuracy.get_linestyle() != f1.get_linestyle()
    assert accuracy.get_linewidth() > f1.get_linewidth()  # the wide one shows around
    assert f1.get_zorder() > accuracy.get_zorder()  # the narrow one, drawn on top


def test_markers_only_while_the_points_are_few():
    assert all(line.get_marker() not in ("None", "", None)
               for line in plots.loss_figure(rows(30)).axes[0].get_lines())
    assert all(line.get_marker() in ("None", "", None)
               for line in plots.loss_figure(rows(400)).axes[0].get_lines())
    assert all(line.get_marker() in ("None", "", None)
               for line in plots.scores_figure(rows(400)).axes[0].get_lines())


def test_confusion_matrix_cells_carry_their_counts_readably():
    cm = np.array([[97, 3, 0], [0, 50, 0], [1, 0, 99]])
    texts = {(t.get_position(), t.get_text()): t.get_color()
             for t in plots.confusion_figure(cm, ["a", "b", "c"]).axes[0].texts}
    assert {text for _, text in texts} == {"97", "3", "50", "1", "99"}
    assert texts[((1, 0), "3")] == "black"  # a 3% error: dark text on a light cell
    assert texts[((0, 0), "97")] == "white"


def test_many_classes_count_their_largest_confusions():
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(20, 40, 196))
    cm[5, 9], cm[100, 3], cm[7, 7] = 17, 11, 30
    labels = [t.get_text() for t in plots.confusion_figure(cm, [str(i) for i in range(196)])
              .axes[0].texts]
    assert labels == ["17", "11"]  # off-diagonal only, largest first


@pytest.mark.parametrize(("name", "magic"), [("c.png", b"\x89PNG"), ("c.jpg", b"\xff\xd8\xff"),
                                              ("c.JPEG", b"\xff\xd8\xff"), ("c.pdf", b"%PDF")])
def test_a_figure_is_written_in_the_format_its_name_says(tmp_path, name, magic):
    plots.save_figure(plots.loss_figure(rows(3)), tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_compare_refuses_an_image_name_it_cannot_honour(tmp_path):
    root = tmp_path / "artifacts"
    make_run(root, job_id(1), optimizer="adam")
    make_run(root, job_id(2), optimizer="adamax")
    out = tmp_path / "curves.gif"
    result = CliRunner().invoke(cli, ["compare", job_id(1), job_id(2), "--artifacts-dir",
                                      str(root), "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.strip() == ("labctl: -o curves.gif: write .png, .jpg, .pdf or .svg "
                                     "(not .gif)")
    jpg = tmp_path / "curves.jpg"
    assert CliRunner().invoke(cli, ["compare", job_id(1), job_id(2), "--artifacts-dir",
                                    str(root), "-o", str(jpg)]).exit_code == 0
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"


def test_a_table_fits_the_terminal_by_abbreviating_then_splitting():
    header = ["setup", "optimizer", "seeds", "final acc", "final F1", "best acc", "s/epoch"]
    long_setup = "model=numpy-cnn dataset=digits batch_size=16 lr=0.005 image_size=28 " * 2
    table = [[long_setup, "adam", "3 (0-2)", "0.91 ± 0.01", "0.90 ± 0.01", "0.93", "1.2"],
             [long_setup, "adamax", "3 (0-2)", "0.93 ± 0.01", "0.92 ± 0.01", "0.94", "1.1"]]
    fitted = render_text(header, table, width=100)
    assert max(len(line) for line in fitted.splitlines()) <= 100
    assert "…" in fitted and "0.93 ± 0.01" in fitted
    narrow = render_text(header, table, width=60)
    assert max(len(line) for line in narrow.splitlines()) <= 60
    for value in ("0.91 ± 0.01", "0.92 ± 0.01", "0.94", "1.1"):  # every figure still there
        assert value in narrow
    assert render_text(header, table) == render_text(header, table, width=10_000)


def test_a_sweep_still_queued_is_one_short_line(tmp_path):
    root = tmp_path / "artifacts"
    jobs = [{"job_id": job_id(n), "params": {"seed": n}} for n in range(240)]
    write_manifest(root, "sw-big", mode="queue", base={}, grid={"seed": list(range(240))},
                   jobs=jobs)
    make_run(root, job_id(0), state="running", accuracies=(0.2,))
    result = CliRunner().invoke(cli, ["compare", "sw-big", "--artifacts-dir", str(root)])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("labctl: no finished runs to compare (240 not finished "
                                     "(239 queued, 1 running))")


def test_a_local_sweep_reports_each_job_as_it_finishes(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", "--local", "--model", "numpy-cnn", "--dataset",
                                      "digits", "--epochs", "1", "--opt", "adam,adamax",
                                      "--limit-train", "64", "--limit-test", "32",
                                      "--artifacts-dir", str(tmp_path / "art"), "--json"])
    assert result.exit_code == 0, result.output
    ids = [job["job_id"] for job in json.loads(result.stdout)["jobs"]]
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert lines[0] == f"[1/2] {ids[0]} optimizer=adam"
    assert lines[1].startswith(f"[1/2] {ids[0]} succeeded: test accuracy 0.")
    assert lines[3].startswith(f"[2/2] {ids[1]} succeeded: test accuracy ")
    assert "{" not in result.stderr

"""Recipes: defaults per (model, dataset) for what the user leaves unset."""

from __future__ import annotations

import json

from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.shared.recipes import RECIPES
from labctl.shared.spec import build_spec


def show(*args: str):
    return CliRunner().invoke(cli, ["spec", "show", *args, "--json"])


def test_unset_fields_come_from_the_recipe_and_spec_show_says_which():
    result = show("--model", "numpy-cnn", "--dataset", "digits", "--opt", "adam")
    shown = json.loads(result.stdout)
    assert (shown["batch_size"], shown["epochs"], shown["lr"]) == (16, 10, 3e-3)
    assert result.stderr.startswith("labctl: from the numpy-cnn/digits recipe: batch_size=16")
    assert "lr=0.003" in result.stderr
    adamax = json.loads(show("--model", "numpy-cnn", "--dataset", "digits").stdout)
    assert adamax["lr"] == 5e-3


def test_what_the_user_gives_beats_the_recipe():
    result = show("--model", "numpy-cnn", "--dataset", "digits", "--batch-size", "32",
                  "--lr", "1e-3")
    shown = json.loads(result.stdout)
    assert (shown["batch_size"], shown["lr"], shown["epochs"]) == (32, 1e-3, 10)
    assert "batch_size" not in result.stderr and "lr=" not in result.stderr


def test_a_recipe_warm_up_stays_shorter_than_the_epochs_asked_for():
    shown = json.loads(show("--model", "resnet50", "--dataset", "stanford-cars", "--epochs",
                            "2").stdout)
    assert shown["warmup_epochs"] == 1 and shown["image_size"] == 224
    assert json.loads(show("--model", "resnet50", "--dataset", "stanford-cars")
                      .stdout)["warmup_epochs"] == 2


def test_without_a_recipe_the_spec_defaults_stand():
    result = show("--model", "numpy-cnn", "--dataset", "imagefolder")
    shown = json.loads(result.stdout)
    assert (shown["batch_size"], shown["epochs"]) == (64, 30) and result.stderr == ""
    assert ("numpy-cnn", "imagefolder") not in RECIPES


def test_a_stored_spec_resolves_its_rate_the_same_way_where_it_runs():
    # Queued and resumed specs keep lr unset; the worker reads the same recipe.
    spec = build_spec({"model": "numpy-cnn", "dataset": "digits", "optimizer": "adam"})
    assert spec.lr is None and spec.effective_lr == 3e-3
    assert build_spec({"model": "resnet50", "optimizer": "adam"}).effective_lr == 1e-3


def test_the_demo_command_reaches_97_percent_on_the_recipe_alone(tmp_path):
    # The Makefile's `make demo` line, which passes no batch size or learning rate.
    result = CliRunner().invoke(cli, ["run", "--model", "numpy-cnn", "--opt", "adamax",
                                      "--dataset", "digits", "--epochs", "10",
                                      "--artifacts-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["final"]["test_accuracy"] >= 0.97

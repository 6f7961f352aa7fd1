"""The command line's rough edges: typed numeric flags, strict numbers, coloured states."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from labctl.cli.main import cli
from labctl.shared.artifacts import ArtifactStore, new_job_id


def invoke(*args: str, color: bool = False):
    return CliRunner().invoke(cli, list(args), color=color)


def test_help_shows_numeric_flags_with_their_type_and_range():
    text = " ".join(invoke("run", "--help").stdout.split())
    assert "--epochs INTEGER Passes over the training split (1<=x<=1000) [30]" in text
    assert "--lr FLOAT Learning rate." in text and "(0<x<=10)" in text
    assert "--batch-size INTEGER" in text and "--epochs TEXT" not in text


@pytest.mark.parametrize("value", ["5_0", "0x10", "1e1", "5.0", "", "fifty"])
def test_an_integer_flag_takes_plain_digits_only(value):
    result = invoke("spec", "show", "--dataset", "digits", "--epochs", value)
    assert result.exit_code == 2
    assert result.stderr == f"labctl: epochs: {value!r} is not an integer\n"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["1_0", "nan", "inf", "0x1p-3"])
def test_a_float_flag_refuses_what_python_float_would_read(value):
    assert invoke("spec", "show", "--lr", value).exit_code == 2


def test_numbers_written_plainly_still_reach_the_spec_and_its_range_check():
    assert '"epochs": 50' in invoke("spec", "show", "--dataset", "digits", "--epochs", "50",
                                    "--json").stdout
    assert '"lr": 0.005' in invoke("spec", "show", "--lr", "5e-3", "--json").stdout
    out_of_range = invoke("spec", "show", "--epochs", "0")
    assert out_of_range.exit_code == 2 and "epochs:" in out_of_range.stderr


def folder_job(root, state: str) -> str:
    folder = ArtifactStore(root).job(new_job_id()).create()
    folder.update_status(state=state, epoch=1, epochs=1)
    return folder.job_id


def test_states_are_coloured_on_a_terminal_and_never_with_no_color(labctl_env, tmp_path,
                                                                  monkeypatch):
    labctl_env(artifacts_dir=tmp_path / "art", redis_url="redis://127.0.0.1:1/0")
    done = folder_job(tmp_path / "art", "succeeded")
    failed = folder_job(tmp_path / "art", "failed")
    coloured = invoke("list", color=True).stdout
    assert "\x1b[32msucceeded" in coloured and "\x1b[31mfailed" in coloured
    assert "\x1b[32msucceeded" in invoke("status", done, color=True).stdout
    plain = invoke("list").stdout  # not a terminal
    assert "\x1b[" not in plain and failed in plain
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in invoke("list", color=True).stdout


def test_a_sweep_list_is_checked_item_by_item():
    result = invoke("sweep", "--local", "--dataset", "digits", "--epochs", "2,5_0")
    assert result.exit_code == 2
    assert result.stderr == "labctl: epochs: '5_0' is not an integer\n"
    assert "--epochs INTEGER[,...]" in invoke("sweep", "--help").stdout

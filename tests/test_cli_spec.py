"""Exit codes and messages of the spec-taking commands, through Click's CliRunner."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labctl.cli.main import cli
from labctl.shared.spec import JobSpec

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli, list(args), catch_exceptions=False)


def assert_clean_failure(result, code: int = 2, mentions: str | None = None):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, result.stderr
    assert lines[0].startswith("labctl: ")
    if mentions:
        assert mentions in result.stderr
    assert result.stdout == ""


def test_schema_is_json_with_defaults():
    result = invoke("spec", "schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["optimizer"]["default"] == "adamax"


def test_validate_good_and_bad_files(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("model: numpy-cnn\ndataset: digits\nepochs: 3\n")
    result = invoke("validate", str(good))
    assert result.exit_code == 0 and "valid" in result.stdout
    assert json.loads(invoke("validate", str(good), "--json").stdout)["epochs"] == 3

    (tmp_path / "unknown.yaml").write_text("modle: numpy-cnn\n")
    assert_clean_failure(invoke("validate", str(tmp_path / "unknown.yaml")),
                         mentions="modle: unknown field")
    (tmp_path / "broken.yaml").write_text("epochs: [\n")
    assert_clean_failure(invoke("validate", str(tmp_path / "broken.yaml")),
                         mentions="not valid YAML")
    (tmp_path / "nan.json").write_text('{"lr": NaN}')
    assert_clean_failure(invoke("validate", str(tmp_path / "nan.json")), mentions="lr:")
    assert_clean_failure(invoke("validate", str(tmp_path / "absent.yaml")),
                         mentions="not found")


def test_flags_override_the_file(tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("model: numpy-cnn\ndataset: digits\nepochs: 3\noptimizer: adam\n")
    shown = json.loads(invoke("spec", "show", "-f", str(spec_file), "--epochs", "7",
                              "--opt", "adamax").stdout)
    assert shown["epochs"] == 7 and shown["optimizer"] == "adamax"
    assert shown["model"] == "numpy-cnn"
    assert shown["lr"] == 5e-3  # the numpy-cnn/digits recipe's AdaMax rate, resolved


def test_missing_dataset_files_exit_2_before_training(tmp_path):
    result = invoke("run", "--model", "numpy-cnn", "--dataset", "mnist",
                    "--data-root", str(tmp_path / "nowhere"),
                    "--artifacts-dir", str(tmp_path / "art"))
    assert_clean_failure(result, mentions="data_root")
    assert not (tmp_path / "art").exists()


def test_mnist_folder_without_files_exits_2_naming_the_file(tmp_path):
    (tmp_path / "mnist").mkdir()
    result = invoke("run", "--model", "numpy-cnn", "--dataset", "mnist",
                    "--data-root", str(tmp_path / "mnist"),
                    "--artifacts-dir", str(tmp_path / "art"), "--epochs", "1")
    assert_clean_failure(result, mentions="train-images-idx3-ubyte")


def test_resume_of_unknown_or_malicious_job(tmp_path):
    art = str(tmp_path / "art")
    assert_clean_failure(invoke("run", "--resume", "20260101-000000-abcdef",
                                "--artifacts-dir", art), code=3)
    assert_clean_failure(invoke("run", "--resume", "../../etc", "--artifacts-dir", art),
                         mentions="invalid job id")


# Each generated case is (flag, value) that must be refused; the field must be named.
NUMERIC_FLAGS = {
    "--epochs": "epochs", "--batch-size": "batch_size", "--lr": "lr",
    "--weight-decay": "weight_decay", "--image-size": "image_size", "--seed": "seed",
    "--limit-train": "limit_train", "--limit-test": "limit_test",
}
bad_numbers = st.one_of(
    st.integers(max_value=-1).map(str),
    st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999", "abc", "", "1.5.2", "0x"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(sorted(NUMERIC_FLAGS)), value=bad_numbers)
def test_generated_bad_numbers_exit_2_naming_the_field(flag, value):
    result = invoke("spec", "show", "--dataset", "digits", flag, value)
    assert_clean_failure(result, mentions=NUMERIC_FLAGS[flag])


@settings(max_examples=40, deadline=None)
@given(field=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
       .filter(lambda f: f not in JobSpec.model_fields),
       value=st.one_of(st.integers(), st.text(max_size=5)))
def test_generated_unknown_fields_exit_2(tmp_path_factory, field, value):
    path = tmp_path_factory.mktemp("spec") / "spec.json"
    path.write_text(json.dumps({field: value}))
    assert_clean_failure(invoke("validate", str(path)), mentions=f"{field}: unknown field")


@settings(max_examples=40, deadline=None)
@given(epochs=st.integers(1, 1000), lr=st.floats(1e-6, 1.0), batch=st.integers(1, 4096))
def test_generated_good_specs_validate(epochs, lr, batch):
    result = invoke("spec", "show", "--dataset", "digits", "--epochs", str(epochs),
                    "--lr", repr(lr), "--batch-size", str(batch))
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["epochs"] == epochs and math.isclose(shown["lr"], lr)


def test_binary_spec_file_exits_2(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(128, 256)))
    assert_clean_failure(invoke("validate", str(path)), mentions="not UTF-8")


def test_ctrl_c_in_any_command_exits_130(monkeypatch, capsys):
    import labctl.cli.main as entry

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry.cli, "main", interrupted)
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 130
    assert "interrupted" in capsys.readouterr().err


def test_entry_point_keeps_click_exit_codes(monkeypatch, capsys):
    import labctl.cli.main as entry

    for argv, code in ((["labctl", "--version"], 0), (["labctl", "run", "--bogus"], 2),
                       (["labctl", "spec", "show", "--epochs", "0"], 2)):
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exited:
            entry.main()
        assert exited.value.code == code, argv
    assert "epochs:" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "text", "mentions"), [
    ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("deep.json", '{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ("complex.yaml", "? [a, b]\n: 1\n", "a key must be"),
    ("date.yaml", "a: 2020-13-45\n", "not valid YAML"),
])
def test_unusable_spec_files_exit_2_in_one_line(tmp_path, name, text, mentions):
    (tmp_path / name).write_text(text)
    assert_clean_failure(invoke("validate", str(tmp_path / name)), mentions=mentions)
    assert_clean_failure(invoke("spec", "show", "-f", str(tmp_path / name)), mentions=mentions)


def test_endless_spec_file_exits_2():
    assert_clean_failure(invoke("validate", "/dev/zero"), mentions="larger than 1 MiB")


def test_empty_name_and_directory_exit_2_saying_so(tmp_path):
    assert_clean_failure(invoke("validate", ""), mentions="spec file name is empty")
    assert_clean_failure(invoke("validate", str(tmp_path)), mentions="is a directory")


def test_init_weights_with_numpy_cnn_exits_2(tmp_path):
    result = invoke("run", "--model", "numpy-cnn", "--dataset", "digits", "--epochs", "1",
                    "--init-weights", "/x", "--artifacts-dir", str(tmp_path / "art"))
    assert_clean_failure(result, mentions="init_weights: applies to resnet50 only")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("args", [("spec", "schema"), ("spec", "show", "--dataset", "digits")])
def test_spec_commands_accept_json_and_print_the_same(args):
    # Scripts pass --json to every read command; here the output is JSON either way.
    plain, flagged = invoke(*args), invoke(*args, "--json")
    assert flagged.exit_code == 0, flagged.output
    assert flagged.stdout == plain.stdout
    json.loads(flagged.stdout)


def test_each_spec_flag_help_is_its_fields_description_and_default():
    from labctl.shared.spec import JobSpec

    options = {p.name.removeprefix("spec__"): p for p in cli.get_command(None, "run").params
               if p.name.startswith("spec__") and p.name != "spec__tags"}
    assert options
    for field, option in options.items():
        info = JobSpec.model_fields[field]
        assert option.help.startswith(info.description.rstrip(".")), field
        if isinstance(info.default, bool):
            assert option.help.endswith("[on]" if info.default else "[off]"), field
        elif info.default is not None:
            assert option.help.endswith(f"[{info.default}]"), field

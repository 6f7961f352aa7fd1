"""The wheel installs one top-level package, ``labctl``, with every source module in it, and
runs a job on its own, apart from the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("bench", "cli", "shared", "worker")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools' build/ folder keeps modules deleted from the source,
    # and a wheel built in place would ship them.
    source = tmp_path_factory.mktemp("source")
    for name in (*SOURCE_FOLDERS, "pyproject.toml", "README.md"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(source)], check=True, capture_output=True,
                   timeout=300)
    (built,) = out.glob("labctl-*.whl")
    return built


def test_the_wheel_has_one_top_level_package_and_every_source_module(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(
        (".dist-info", ".data"))}
    assert top_level == {"labctl"}
    packaged = {name for name in names if name.endswith(".py")}
    source = {f"labctl/{path.relative_to(REPO).as_posix()}"
              for folder in SOURCE_FOLDERS for path in (REPO / folder).rglob("*.py")
              if "__pycache__" not in path.parts}
    assert packaged == source


def test_pyproject_lists_every_subpackage():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    on_disk = {"labctl." + init.parent.relative_to(REPO).as_posix().replace("/", ".")
               for folder in SOURCE_FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert listed == on_disk


def test_the_installed_wheel_trains_a_job_outside_the_checkout(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    # -S: no site hook, so the checkout's editable install cannot answer the import; the
    # dependencies come from this environment's site-packages, labctl from the wheel alone.
    path = f"{target}:{sysconfig.get_paths()['purelib']}"
    run = tmp_path / "elsewhere"
    run.mkdir()
    located = subprocess.run(
        [sys.executable, "-S", "-c", "import labctl.shared.spec as m; print(m.__file__)"],
        cwd=run, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=60, check=True)
    assert located.stdout.strip().startswith(str(target))
    done = subprocess.run(
        [sys.executable, "-S", "-m", "labctl.cli.main", "run", "--model", "numpy-cnn",
         "--dataset", "digits", "--epochs", "1", "--limit-train", "64", "--limit-test", "32",
         "--artifacts-dir", str(run / "artifacts"), "--json"],
        cwd=run, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (folder,) = (run / "artifacts").iterdir()
    assert (folder / "summary.json").is_file()

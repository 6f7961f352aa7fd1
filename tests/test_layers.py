"""Layers point down (shared <- worker <- cli), and the read commands start light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.cli.main import COMMANDS, cli
from labctl.shared.testing import free_port

REPO = Path(__file__).resolve().parents[1]
#: A module of each folder may import from the folders listed, and from its own.
ALLOWED = {"shared": set(), "worker": {"shared"}, "cli": {"shared", "worker", "bench"},
           "bench": {"shared", "worker"}}


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_no_import_points_up_a_layer(folder):
    offending = []
    for path in (REPO / folder).rglob("*.py"):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "labctl" and len(parts) > 1:
                target = parts[1]
                if target != folder and target not in ALLOWED[folder]:
                    offending.append(f"{path.relative_to(REPO)} imports {name}")
            if parts[0] in ("tests", "procs", "conftest"):
                offending.append(f"{path.relative_to(REPO)} imports {name}")
    assert offending == []


def test_nothing_that_ships_edits_sys_path():
    edits = [str(path.relative_to(REPO)) for folder in ALLOWED
             for path in (REPO / folder).rglob("*.py") if "sys.path" in path.read_text()]
    assert edits == []


def modules_loaded_by(*args: str) -> tuple[int, set[str]]:
    code = ("import sys\n"
            f"sys.argv = ['labctl', *{list(args)!r}]\n"
            "from labctl.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
            "heavy = [m for m in ('numpy', 'torch', 'matplotlib') if m in sys.modules]\n"
            "print(code, ' '.join(heavy), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin",
                                           "LABCTL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    code, _, heavy = done.stderr.strip().splitlines()[-1].partition(" ")
    return int(code), set(heavy.split())


@pytest.mark.parametrize("args", [("--help",), ("status", "20260101-000000-abcdef"),
                                  ("list",), ("cancel", "--help")])
def test_read_commands_load_neither_numpy_nor_torch(args):
    code, heavy = modules_loaded_by(*args)
    assert code in (0, 69)  # 69: the private port has no Redis behind it
    assert heavy == set()


def test_the_command_table_matches_each_command():
    for name, (module, attr, short_help) in COMMANDS.items():
        command = cli.get_command(None, name)
        assert command.name == name, module
        assert command.get_short_help_str(limit=1000) == short_help, attr

"""Sweep grids: comma lists in spec flags -> the product of specs, and back to a command.

``--opt adam,adamax --lr 1e-3,2e-3 --seeds 3`` is 2 x 2 x 3 = 12 specs. The seed is the
outermost loop, so a sweep run in order completes whole seed blocks first: stopped half-way,
it still holds paired runs to compare.
"""

from __future__ import annotations

import itertools
import shlex
from typing import Any

from labctl.shared.spec import JobSpec

MAX_JOBS = 1000
#: Values that never take a comma list: free text where a comma may be meant literally.
NOT_SPLIT = frozenset({"data_root", "init_weights"})


class GridError(ValueError):
    pass


def split_values(spec_values: dict[str, Any], seeds: int | None
                 ) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(base values, grid of field -> raw values), grid in spec field order, seed first."""
    base, grid = {}, {}
    for name, value in spec_values.items():
        if isinstance(value, str) and "," in value and name not in NOT_SPLIT:
            items = [item.strip() for item in value.split(",")]
            if any(not item for item in items):
                raise GridError(f"{name}: empty value in comma list {value!r}")
            if len(set(items)) != len(items):
                raise GridError(f"{name}: repeated value in comma list {value!r}")
            grid[name] = items
        else:
            base[name] = value
    if seeds is not None:
        if "seed" in spec_values:
            raise GridError("seed: give --seeds N or --seed LIST, not both")
        if seeds < 1:
            raise GridError("seeds: must be at least 1")
        base.pop("seed", None)
        grid["seed"] = list(range(seeds))
    order = ["seed"] + [f for f in JobSpec.model_fields if f != "seed"]
    grid = {name: grid[name] for name in order if name in grid}
    size = 1
    for values in grid.values():
        size *= len(values)
    if size > MAX_JOBS:
        raise GridError(f"the grid has {size} jobs; at most {MAX_JOBS} per sweep")
    return base, grid


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(grid[n] for n in names))]


def sweep_command(manifest: dict[str, Any]) -> str:
    """The ``labctl sweep`` line that reproduces a manifest's grid."""
    from labctl.cli.spec_options import BOOL_FLAGS, VALUE_FLAGS

    value_flag = {field: decls[0] for decls, field in VALUE_FLAGS}
    bool_flag = {field: decl.split("/") for decl, field in BOOL_FLAGS}
    words = ["labctl", "sweep"]
    grid = dict(manifest.get("grid", {}))
    seeds = manifest.get("seeds")
    if seeds and grid.get("seed") == list(range(seeds)):
        del grid["seed"]  # typed as --seeds N
    else:
        seeds = None
    values = {**manifest.get("base", {}),
              **{k: ",".join(str(v) for v in vs) for k, vs in grid.items()}}
    # In spec order (model, optimizer, dataset, ...): reads like a hand-written command.
    for name in sorted(values, key=lambda n: list(JobSpec.model_fields).index(n)
                       if n in JobSpec.model_fields else len(JobSpec.model_fields)):
        value = values[name]
        if name == "sweep_id" or value is None:
            continue
        if name in bool_flag:
            on = value if isinstance(value, bool) else str(value).lower() == "true"
            words.append(bool_flag[name][0 if on else 1])
        elif name == "tags":
            words += [w for tag in value for w in ("--tag", tag)]
        elif name in value_flag:
            words += [value_flag[name], str(value)]
    if seeds:
        words += ["--seeds", str(seeds)]
    if manifest.get("mode") == "local":
        words.append("--local")
    if manifest.get("artifacts_dir"):
        words += ["--artifacts-dir", str(manifest["artifacts_dir"])]
    env = [f"{name}={shlex.quote(str(value))}" for name, value in manifest.get("env", {}).items()]
    return " ".join([*env, shlex.join(words)])

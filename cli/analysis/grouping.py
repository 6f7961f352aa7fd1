"""Arrange runs for comparison.

A *block* holds every setting equal except the compared field and the seed (e.g. all
numpy-cnn runs); inside it, a *group* holds the runs sharing one value of the compared
field (e.g. adam). Groups of one block are compared pair by pair, runs matched by seed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from labctl.cli.analysis.runs import Run
from labctl.shared.spec import JobSpec

#: Never split blocks: they label runs or change nothing a metric depends on.
IGNORED_FIELDS = frozenset({"seed", "name", "tags", "sweep_id", "num_workers", "data_root"})
#: Optimizer settings that may differ between the compared optimizers of one setup: each
#: optimizer's own (tuned) values go with it, as its default learning rate does.
OPTIMIZER_SETTINGS = ("lr", "betas", "eps", "weight_decay")
#: Values that read well without their field name in a label.
SELF_NAMED = ("model", "dataset", "optimizer")


class BadField(ValueError):
    pass


@dataclass
class Group:
    field: str
    value: Any
    runs: list[Run]

    @property
    def label(self) -> str:
        return _value_label(self.field, self.value)

    def by_seed(self) -> dict[int, Run]:
        return {run.seed: run for run in self.runs}


@dataclass
class Block:
    fields: dict[str, Any]
    groups: list[Group]
    label: str = ""

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "._-" else "-" for c in self.label)[:80]


def _value_label(name: str, value: Any) -> str:
    return str(value) if name in SELF_NAMED else f"{name}={value}"


def check_field(name: str) -> str:
    if name not in JobSpec.model_fields or name in ("seed", "tags"):
        choices = ", ".join(f for f in JobSpec.model_fields if f not in ("seed", "tags"))
        raise BadField(f"--by: unknown spec field {name!r} (choose from {choices})")
    return name


def varying_fields(runs: list[Run], exclude: str) -> list[str]:
    """Spec fields whose value differs between runs, in spec order."""
    names = []
    for name in JobSpec.model_fields:
        if name in IGNORED_FIELDS or name == exclude:
            continue
        values = {_hashable(run.spec.get(name)) for run in runs}
        if len(values) > 1:
            names.append(name)
    return names


def make_blocks(runs: list[Run], by: str = "optimizer") -> tuple[list[Block], list[str]]:
    """Blocks in first-seen order, groups sorted by value. Returns (blocks, notes): a note
    for each run dropped because a later run had the same settings and seed."""
    check_field(by)
    varying = varying_fields(runs, exclude=by)
    attachable = [f for f in varying if by == "optimizer" and f in OPTIMIZER_SETTINGS]
    outer = [f for f in varying if f not in attachable]
    by_outer: dict[tuple, list[Run]] = {}
    for run in runs:
        by_outer.setdefault(tuple(_hashable(run.spec.get(f)) for f in outer), []).append(run)
    blocks: dict[tuple, dict[Any, list[Run]]] = {}
    keys: dict[tuple, dict[str, Any]] = {}
    for members in by_outer.values():
        # Settings each optimizer holds at one value of its own (a tuned configuration)
        # belong to the compared optimizer, not to the setup.
        split = outer + [f for f in attachable if not _follows(members, f, by)]
        for run in members:
            key = tuple((f, _hashable(run.spec.get(f))) for f in split)
            keys.setdefault(key, {f: run.spec.get(f) for f in split})
            blocks.setdefault(key, {}).setdefault(_hashable(run.spec.get(by)), []).append(run)
    result, notes = [], []
    for key, by_value in blocks.items():
        groups = []
        for value in sorted(by_value, key=lambda v: (v is None, str(v))):
            group, dropped = _dedupe(by, value, by_value[value])
            notes.extend(dropped)
            groups.append(group)
        result.append(Block(fields=keys[key], groups=groups))
    _label_blocks(result, by)
    return result, notes


def _follows(runs: list[Run], name: str, by: str) -> bool:
    """Whether ``name`` differs among ``runs`` only because ``by`` does: each value of
    ``by`` comes with a single value of it, not all the same one."""
    seen: dict[Any, set] = {}
    for run in runs:
        seen.setdefault(_hashable(run.spec.get(by)), set()).add(_hashable(run.spec.get(name)))
    single = all(len(values) == 1 for values in seen.values())
    return single and len(set().union(*seen.values())) > 1


def _label_blocks(blocks: list[Block], by: str) -> None:
    """"numpy-cnn on digits"; every other setting that differs between the runs is added to
    each label that would otherwise read like another block's."""
    labels = [_base_label(block, by) for block in blocks]
    labels = _disambiguate(labels, lambda i, label: _with_settings(label, blocks[i]))
    # Still equal only where settings print alike (1 vs "1"): number them.
    labels = _disambiguate(labels, lambda i, label: f"{label} #{i + 1}")
    for block, label in zip(blocks, labels, strict=True):
        block.label = label


def _base_label(block: Block, by: str) -> str:
    spec = block.groups[0].runs[0].spec

    def part(name: str) -> str:
        if name == by:  # it varies inside the block: one run's value would misname it
            return " vs ".join(str(group.value) for group in block.groups)
        return str(spec.get(name))

    return f"{part('model')} on {part('dataset')}"


def _with_settings(label: str, block: Block) -> str:
    extra = [_value_label(k, v) for k, v in block.fields.items() if k not in ("model", "dataset")]
    return f"{label} ({', '.join(extra)})" if extra else label


def _disambiguate(labels: list[str], rename) -> list[str]:
    # Counted before renaming any: renaming the first duplicate must not hide the others.
    counts = Counter(labels)
    return [rename(i, label) if counts[label] > 1 else label for i, label in enumerate(labels)]


def _dedupe(by: str, value: Any, runs: list[Run]) -> tuple[Group, list[str]]:
    # Job ids sort by creation time, so the last run of a seed is the newest one.
    latest: dict[int, Run] = {}
    notes = []
    for run in sorted(runs, key=lambda r: r.job_id):
        if run.seed in latest:
            notes.append(f"{latest[run.seed].job_id}: superseded by {run.job_id} "
                         f"(same settings, seed {run.seed})")
        latest[run.seed] = run
    kept = sorted(latest.values(), key=lambda r: r.seed)
    return Group(field=by, value=value, runs=kept), notes


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value

"""Turn what the user typed (job ids, sweep ids, folder paths) into loaded runs.

A reference is tried, in order, as: a job id under the artefacts root; a sweep id (its
manifest, else every job whose spec carries that ``sweep_id``, e.g. submitted by hand);
a job folder path; a folder of job folders. Only the files on disk are read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.cli.analysis.manifest import read_manifest
from labctl.shared.artifacts import JOB_ID_PATTERN, read_json, read_jsonl
from labctl.shared.jobstate import JobState


class RunNotFound(LookupError):
    """A reference that names no job, sweep or folder."""


@dataclass
class Run:
    job_id: str
    path: Path
    spec: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def state(self) -> str:
        if self.summary is not None and self.status.get("state") in (None, "succeeded"):
            return "succeeded"
        return self.status.get("state") or "unknown"

    @property
    def seed(self) -> int:
        return int(self.spec.get("seed", 0))

    @property
    def usable(self) -> bool:
        """Finished with metrics: a run still going (or failed) would compare an early
        epoch against another run's last one."""
        return self.state == JobState.SUCCEEDED and bool(self.metrics)


@dataclass
class Selection:
    runs: list[Run]
    #: sweep manifests that contributed runs (for the report's reproduce section)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    #: one line per run left out, and why
    skipped: list[str] = field(default_factory=list)


class DamagedRun(ValueError):
    """A job folder whose files cannot be read as a run (torn or hand-edited)."""


#: What the figures and curves read from each epoch's row.
METRIC_KEYS = ("epoch", "train_loss", "test_loss", "test_accuracy", "test_f1_macro",
               "epoch_seconds", "images_per_second")


def load_run(path: Path) -> Run | None:
    """None before the job wrote its spec; raises :class:`DamagedRun` with the reason."""
    spec = _read_object(path / "spec.json")
    if spec is None:
        return None
    if not isinstance(spec.get("seed", 0), int) or isinstance(spec.get("seed"), bool):
        raise DamagedRun("spec.json seed is not a whole number")  # runs pair by seed
    return Run(job_id=path.name, path=path, spec=spec,
               status=_read_object(path / "status.json") or {},
               metrics=_read_metrics(path / "metrics.jsonl"),
               summary=_read_object(path / "summary.json"))


def _read_object(path: Path) -> dict[str, Any] | None:
    try:
        value = read_json(path)
    except ValueError:  # bad JSON or bad UTF-8
        raise DamagedRun(f"{path.name} is not valid JSON") from None
    except OSError as exc:
        raise DamagedRun(f"cannot read {path.name}: {exc.strerror}") from None
    if value is not None and not isinstance(value, dict):
        raise DamagedRun(f"{path.name} is not a JSON object")
    return value


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    try:
        rows = read_jsonl(path)
    except (ValueError, OSError):
        raise DamagedRun(f"cannot read {path.name}") from None
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DamagedRun(f"{path.name} row {n} is not a JSON object")
        where = f"epoch {row['epoch']}" if _is_number(row.get("epoch")) else f"row {n}"
        for key in METRIC_KEYS:
            if key not in row:
                raise DamagedRun(f"{path.name} {where} has no {key}")
            if not _is_number(row[key]):
                raise DamagedRun(f"{path.name} {where}: {key} is not a number")
    return sorted(rows, key=lambda r: r["epoch"])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def select_runs(refs: list[str], root: str | Path) -> Selection:
    """Load every run named by ``refs``; raise :class:`RunNotFound` for the first unknown one.

    Runs that did not finish, or whose files are damaged, are reported in ``skipped``
    rather than silently compared.
    """
    root = Path(root)
    selection = Selection(runs=[])
    seen: set[Path] = set()
    unfinished: list[tuple[str, str]] = []  # (state, note)
    for ref in refs:
        for path in _resolve(ref, root, selection):
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                run = load_run(path)
            except DamagedRun as exc:
                selection.skipped.append(f"{path.name}: damaged, {exc}")
                continue
            if run is None:
                unfinished.append(("queued", f"{path.name}: no spec.json yet (queued?)"))
            elif not run.usable:
                epoch = len(run.metrics)
                unfinished.append((run.state or "unknown",
                                   f"{run.job_id}: {run.state} after {epoch} epoch(s)"))
            else:
                selection.runs.append(run)
    selection.skipped.extend(summarise_unfinished(unfinished))
    return selection


#: Up to this many unfinished runs are named one by one; more are counted by state.
NAMED_UNFINISHED = 5


def summarise_unfinished(unfinished: list[tuple[str, str]]) -> list[str]:
    """One note per unfinished run, or, for a big sweep still under way, one short line:
    "240 not finished (238 queued, 2 running)"."""
    if len(unfinished) <= NAMED_UNFINISHED:
        return [note for _, note in unfinished]
    counts = Counter(state for state, _ in unfinished)
    return [f"{len(unfinished)} not finished ("
            + ", ".join(f"{n} {state}" for state, n in counts.most_common()) + ")"]


def _resolve(ref: str, root: Path, selection: Selection) -> list[Path]:
    if JOB_ID_PATTERN.fullmatch(ref) and (root / ref).is_dir():
        return [root / ref]
    manifest = _manifest(root, ref, selection)
    if manifest is not None:
        selection.manifests.append(manifest)
        return [root / job["job_id"] for job in manifest.get("jobs", [])
                if isinstance(job, dict) and JOB_ID_PATTERN.fullmatch(str(job.get("job_id", "")))]
    tagged, unreadable = _jobs_of_sweep(root, ref)
    if tagged:
        # A spec that cannot be read may be one of this sweep's runs: say so.
        selection.skipped.extend(unreadable)
        return tagged
    path = Path(ref)
    if (path / "spec.json").is_file():
        return [path]
    if path.is_dir():
        children = sorted(p for p in path.iterdir() if (p / "spec.json").is_file())
        if children:
            return children
    if any(note.startswith(f"sweep manifest of {ref}:") for note in selection.skipped):
        raise RunNotFound(f"sweep {ref}: its manifest is damaged and no run under {root} "
                          "carries its id")
    raise RunNotFound(f"no job, sweep or run folder {ref!r} (looked under {root})")


def _manifest(root: Path, sweep_id: str, selection: Selection) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(root, sweep_id)
    except (ValueError, OSError):
        manifest = None
        damaged = True
    else:
        damaged = manifest is not None and (not isinstance(manifest, dict)
                                            or not isinstance(manifest.get("jobs", []), list))
    if damaged:
        # The runs still carry their sweep id, so the tag scan can find them without it.
        selection.skipped.append(f"sweep manifest of {sweep_id}: damaged, its runs are "
                                 "found by their spec's sweep_id instead")
        return None
    return manifest


def _jobs_of_sweep(root: Path, sweep_id: str) -> tuple[list[Path], list[str]]:
    """(job folders tagged ``sweep_id``, a skip note for each whose spec cannot be read)."""
    found: list[Path] = []
    unreadable: list[str] = []
    if not root.is_dir():
        return found, unreadable
    for path in sorted(root.iterdir()):
        if JOB_ID_PATTERN.fullmatch(path.name):
            try:
                spec = _read_object(path / "spec.json") or {}
            except DamagedRun as exc:
                unreadable.append(f"{path.name}: damaged, {exc}")
                continue
            if spec.get("sweep_id") == sweep_id:
                found.append(path)
    return found, unreadable

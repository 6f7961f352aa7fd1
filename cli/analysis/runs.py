"""Turn what the user typed (job ids, sweep ids, folder paths) into loaded runs.

A reference is tried, in order, as: a job id under the artefacts root; a sweep id (its
manifest, else every job whose spec carries that ``sweep_id``, e.g. submitted by hand);
a job folder path; a folder of job folders. Only the files on disk are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.artifacts import JOB_ID_PATTERN, read_json, read_jsonl

from .manifest import read_manifest


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
        return self.state == "succeeded" and bool(self.metrics)


@dataclass
class Selection:
    runs: list[Run]
    #: sweep manifests that contributed runs (for the report's reproduce section)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    #: one line per run left out, and why
    skipped: list[str] = field(default_factory=list)


def load_run(path: Path) -> Run | None:
    spec = read_json(path / "spec.json")
    if spec is None:
        return None
    return Run(job_id=path.name, path=path, spec=spec,
               status=read_json(path / "status.json", default={}),
               metrics=sorted(read_jsonl(path / "metrics.jsonl"), key=lambda r: r["epoch"]),
               summary=read_json(path / "summary.json"))


def select_runs(refs: list[str], root: str | Path) -> Selection:
    """Load every run named by ``refs``; raise :class:`RunNotFound` for the first unknown one.

    Runs that did not finish are reported in ``skipped`` rather than silently compared.
    """
    root = Path(root)
    selection = Selection(runs=[])
    seen: set[Path] = set()
    for ref in refs:
        for path in _resolve(ref, root, selection):
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            run = load_run(path)
            if run is None:
                selection.skipped.append(f"{path.name}: no spec.json yet (queued?)")
            elif not run.usable:
                epoch = len(run.metrics)
                selection.skipped.append(f"{run.job_id}: {run.state} after {epoch} epoch(s)")
            else:
                selection.runs.append(run)
    return selection


def _resolve(ref: str, root: Path, selection: Selection) -> list[Path]:
    if JOB_ID_PATTERN.fullmatch(ref) and (root / ref).is_dir():
        return [root / ref]
    manifest = read_manifest(root, ref)
    if manifest is not None:
        selection.manifests.append(manifest)
        return [root / job["job_id"] for job in manifest.get("jobs", [])
                if JOB_ID_PATTERN.fullmatch(str(job.get("job_id", "")))]
    tagged = _jobs_of_sweep(root, ref)
    if tagged:
        return tagged
    path = Path(ref)
    if (path / "spec.json").is_file():
        return [path]
    if path.is_dir():
        children = sorted(p for p in path.iterdir() if (p / "spec.json").is_file())
        if children:
            return children
    raise RunNotFound(f"no job, sweep or run folder {ref!r} (looked under {root})")


def _jobs_of_sweep(root: Path, sweep_id: str) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if JOB_ID_PATTERN.fullmatch(path.name):
            spec = read_json(path / "spec.json") or {}
            if spec.get("sweep_id") == sweep_id:
                found.append(path)
    return found

"""The artefact store: one folder per job under a root, every write atomic.

Layout of ``<root>/<job_id>/``::

    spec.json        the spec as submitted
    status.json      state, timestamps, epoch, error (mirrors the queue's job record)
    metrics.jsonl    one JSON object per finished epoch
    log.txt          the human-readable lines: one per epoch, resume and outcome (what
                     ``labctl logs`` shows)
    traceback.txt    the last crash's traceback (log.txt has its one-line outcome)
    checkpoint.*     the latest resumable state (.npz for numpy-cnn, .pt for resnet50);
                     dropped when the job succeeds unless LABCTL_KEEP_CHECKPOINT is set
    model.*          final weights
    plots/*.png      loss, accuracy and F1 curves; confusion matrix
    summary.json     final and best metrics, sizes, total time
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: ``20261128-201500-a1b2c3``: sorts by creation time, unique enough, safe in a path.
JOB_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


class InvalidJobId(ValueError):
    pass


class DamagedFile(ValueError):
    """A job file that is there but cannot be read as what it should be (torn, edited)."""

    def __init__(self, path: Path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{self.path.name} is damaged ({why})")


def new_job_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def validate_job_id(job_id: str) -> str:
    """Every path built from a job id goes through here: no traversal into the store."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidJobId(f"invalid job id {job_id!r} (expected YYYYMMDD-HHMMSS-xxxxxx)")
    return job_id


def utc_now() -> str:
    """UTC with milliseconds, for every stamp labctl writes (queue latency is measured from
    the records' stamps)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once, at import: os.umask can only be read by setting it, which races with threads.
_UMASK = _process_umask()


def mkstemp_like_open(directory: Path, prefix: str = "", suffix: str = ".tmp") -> str:
    """``tempfile.mkstemp``, closed, with the mode ``open()`` would give (0666 less the
    umask). mkstemp makes files 0600, which on a shared artefacts volume locks every other
    user (Grafana, a teammate's ``labctl compare``) out of the files it renames into place."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return tmp


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds.

    A reader (or a resumed job) sees the old file or the new one, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(mkstemp_like_open(path.parent, prefix=f".{path.name}."))
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def read_json_object(path: Path, default: Any = None) -> Any:
    """A JSON object file, ``default`` if there is none; :class:`DamagedFile` (a
    ``ValueError``) for one that is not a JSON object (torn, or edited by hand)."""
    try:
        value = read_json(path, default)
    except ValueError:  # bad JSON or bad UTF-8
        raise DamagedFile(path, "not valid JSON") from None
    if value is not default and not isinstance(value, dict):
        raise DamagedFile(path, "not a JSON object")
    return value


def append_line(path: Path, line: str) -> None:
    """Append one line and flush it to disk: a crash loses at most the line being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (crash mid-write) is skipped."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class JobFolder:
    """One job's artefact folder."""

    def __init__(self, root: Path, job_id: str):
        self.job_id = validate_job_id(job_id)
        self.path = Path(root) / job_id

    spec_path = property(lambda self: self.path / "spec.json")
    status_path = property(lambda self: self.path / "status.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    log_path = property(lambda self: self.path / "log.txt")
    traceback_path = property(lambda self: self.path / "traceback.txt")
    summary_path = property(lambda self: self.path / "summary.json")
    plots_dir = property(lambda self: self.path / "plots")

    def create(self) -> JobFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def exists(self) -> bool:
        return self.path.is_dir()

    def read_spec(self) -> dict[str, Any] | None:
        return read_json_object(self.spec_path)

    def read_status(self) -> dict[str, Any]:
        """``{}`` before the job first ran."""
        return read_json_object(self.status_path, default={})

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_path)

    def update_status(self, **fields: Any) -> dict[str, Any]:
        status = self.read_status()
        status.update(fields)
        status["id"] = self.job_id
        write_json(self.status_path, status)
        return status

    def append_metrics(self, row: dict[str, Any]) -> None:
        append_line(self.metrics_path, json.dumps(row, sort_keys=True))

    def keep_metrics_through(self, epoch: int) -> None:
        """On resume: drop rows past the checkpoint's epoch so each epoch appears exactly once."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        seen: dict[int, dict[str, Any]] = {r["epoch"]: r for r in rows}
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(seen[e], sort_keys=True) + "\n"
                                   for e in sorted(seen)))

    def log(self, line: str) -> None:
        append_line(self.log_path, line)

    def replace_log(self, lines: list[str]) -> None:
        """Rewrite log.txt whole, atomically (a resume mending it)."""
        with atomic_path(self.log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))

    def read_log(self) -> list[str]:
        try:
            # errors="replace": a torn or overwritten log still shows what it can.
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []


class ArtifactStore:
    """The root folder holding every job's folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def job(self, job_id: str) -> JobFolder:
        return JobFolder(self.root, job_id)

    def job_ids(self) -> list[str]:
        """Every job id present, oldest first (ids sort by time)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and JOB_ID_PATTERN.fullmatch(p.name))

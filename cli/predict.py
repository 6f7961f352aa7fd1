"""``labctl predict JOB IMAGE...``: classify images with a finished job's final weights.

Read from the job's folder (spec, summary, weights), like ``compare``; Redis is asked only
when the folder is not on this host, to tell a queued job from one that does not exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from labctl.cli.broker import broker_errors, checked_job_id, open_records
from labctl.cli.errors import BadSpec, JobBusy, JobFailed, LabctlError, NotFound
from labctl.cli.folder_view import ABANDONED, folder_record
from labctl.cli.run import artifacts_dir_option
from labctl.shared.artifacts import ArtifactStore, JobFolder
from labctl.shared.jobstate import JobState
from labctl.shared.settings import get_settings
from labctl.shared.spec import DEVICE_PATTERN, JobSpec, SpecError, build_spec


@click.command("predict")
@click.argument("job_id", metavar="JOB")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@artifacts_dir_option
@click.option("--top-k", "-k", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="classes shown per image, most probable first")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N (resnet50 only), or auto (cuda when present)")
@click.option("--json", "as_json", is_flag=True,
              help="print the job and every image's top classes as JSON")
def predict(job_id: str, images: tuple[str, ...], artifacts_dir: str | None, top_k: int,
            device: str, as_json: bool) -> None:
    """Classify images with a finished job's final weights: top-k classes and probabilities.

    Each IMAGE (any format and size Pillow reads) is preprocessed as the job's test images
    were: converted to grey or colour as its dataset is, resized and cropped to the job's
    image size, normalised with the dataset's statistics.
    """
    from labctl.worker.engine import DataError
    from labctl.worker.predict import class_names_of, load_predictor, weights_path
    from labctl.worker.predict import predict as predict_images

    job_id = checked_job_id(job_id)
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise BadSpec(f"device: {device!r} is not auto, cpu, cuda or cuda:N")
    for image in images:
        _check_image_file(image)
    folder, spec = finished_job(job_id, artifacts_dir or get_settings().artifacts_dir)
    summary = folder.read_summary() or {}
    weights = weights_path(folder.path, spec.model)
    if not weights.is_file():
        raise JobFailed(f"job {job_id} has no final weights: expected {weights.name} in "
                        f"{folder.path}")
    try:
        predictor = load_predictor(spec, weights, class_names_of(spec, summary), device)
    except SpecError as exc:
        raise BadSpec(str(exc)) from None
    except DataError as exc:  # weights that do not load, or class names it cannot find
        raise JobFailed(f"job {job_id}: {exc}") from None
    try:
        predictions = predict_images(predictor, list(images), top_k)
    except DataError as exc:  # an image Pillow cannot decode, or a dataset with no images
        raise BadSpec(str(exc)) from None
    # After the images are read: a bad one is the only line on stderr.
    accuracy = (summary.get("final") or {}).get("test_accuracy")
    recorded = f", test accuracy {accuracy:.4f}" if isinstance(accuracy, float) else ""
    click.echo(f"labctl: job {job_id}: {spec.model} on {spec.dataset}{recorded}; "
               f"{len(images)} image(s) on {device}", err=True)
    if as_json:
        click.echo(json.dumps({
            "job_id": job_id, "model": spec.model, "dataset": spec.dataset,
            "predictions": [{"image": p.image,
                             "top": [{"class": s.name, "index": s.index,
                                      "probability": s.probability} for s in p.top]}
                            for p in predictions]}, indent=2))
        return
    for prediction in predictions:
        click.echo(prediction.image)
        for score in prediction.top:
            click.echo(f"  {score.probability:7.2%}  {score.name}")


def _check_image_file(image: str) -> None:
    path = Path(image)
    if path.is_dir():
        raise BadSpec(f"{image} is a folder, not an image file")
    if not path.is_file():
        raise BadSpec(f"{image}: no such file")


def finished_job(job_id: str, artifacts_dir: str) -> tuple[JobFolder, JobSpec]:
    """The folder and spec of a job that succeeded; any other job is one line and its
    exit code (3 unknown, 4 queued or running, 1 failed, cancelled or abandoned)."""
    folder = ArtifactStore(artifacts_dir).job(job_id)
    if not folder.exists():
        raise _without_folder(job_id, artifacts_dir)
    try:
        record = folder_record(folder)
        spec = build_spec(folder.read_spec() or {})
    except (ValueError, OSError) as exc:  # SpecError is a ValueError too
        raise LabctlError(f"job {job_id}: cannot read its folder {folder.path}: {exc}") \
            from None
    if record is None:
        raise NotFound(f"no job {job_id} in {artifacts_dir} (its folder has no status.json)")
    _refuse_unless_succeeded(job_id, record)
    return folder, spec


def _without_folder(job_id: str, artifacts_dir: str) -> LabctlError:
    """Why a job has no folder here: unknown, not started yet, or written on another host."""
    try:
        records = open_records()
        with broker_errors():
            record = records.get(job_id)
    except LabctlError:  # Redis unreachable or misconfigured: the folder was the question
        record = None
    if record is None:
        return NotFound(f"no job {job_id} in {artifacts_dir}")
    try:
        _refuse_unless_succeeded(job_id, record)
    except LabctlError as refusal:
        return refusal
    return NotFound(f"job {job_id} succeeded but its folder is not in {artifacts_dir}; pass "
                    "--artifacts-dir where its worker wrote it")


def _refuse_unless_succeeded(job_id: str, record: dict[str, Any]) -> None:
    state = record.get("state")
    if state in (JobState.QUEUED, JobState.RUNNING):
        raise JobBusy(f"job {job_id} is {state}; it has final weights once it succeeds "
                      f"(labctl status {job_id})")
    if state == ABANDONED:
        raise JobFailed(f"job {job_id} stopped without finishing, so it has no final weights; "
                        f"resume it with labctl run --resume {job_id}")
    if state != JobState.SUCCEEDED:
        ended = "was cancelled" if state == JobState.CANCELLED else state
        raise JobFailed(f"job {job_id} {ended}, so it has no final weights "
                        f"(labctl status {job_id} says why)")

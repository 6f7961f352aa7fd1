"""The job spec: what to train, on what, and how.

One pydantic model, ``JobSpec``, is the contract between the CLI that submits a
job and the worker that runs it. Every number is bounded and unknown fields are
refused, so a typo fails at submit time instead of an hour into a GPU job.

Checks that depend on the host running the job (does ``data_root`` exist, is
there a CUDA device) live in :func:`check_runtime`, called where the job runs.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Model = Literal["numpy-cnn", "resnet50"]
Optimizer = Literal["adam", "adamax"]
Dataset = Literal["digits", "mnist", "stanford-cars", "imagefolder", "synthetic"]
LrSchedule = Literal["constant", "cosine"]
Priority = Literal["high", "normal", "low"]
DataPath = Literal["auto", "cache", "stream"]

#: Kingma & Ba (2015), Algorithm 1 and section 7.1.
DEFAULT_LR = {"adam": 1e-3, "adamax": 2e-3}
#: Datasets read from files under ``data_root``; the others are generated or bundled.
FILE_DATASETS = frozenset({"mnist", "stanford-cars", "imagefolder"})
#: Datasets of photo files: the ones ``data_path`` chooses decode-once or streaming for.
PHOTO_DATASETS = frozenset({"stanford-cars", "imagefolder"})
#: Native side length of each dataset, used when ``image_size`` is left unset.
NATIVE_IMAGE_SIZE = {"digits": 8, "mnist": 28, "synthetic": 32, "stanford-cars": 224,
                     "imagefolder": 224}
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d{1,2})$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
#: The most ranks one job may ask for: one box's GPUs (jobs do not span hosts).
MAX_DEVICES = 64
#: A spec is a few hundred bytes; the cap keeps /dev/zero or a stray dataset from eating memory.
MAX_SPEC_FILE_BYTES = 1 << 20


class SpecError(ValueError):
    """A spec that cannot run, with the field at fault (``None`` for the whole spec)."""

    def __init__(self, field: str | None, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class JobSpec(BaseModel):
    """A training job. Defaults describe the lab's flagship run: ResNet50 on Stanford Cars."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: Model = Field("resnet50", description="Network: our NumPy CNN or our ResNet50.")
    optimizer: Optimizer = Field("adamax", description="Adam or AdaMax (Kingma & Ba).")
    dataset: Dataset = Field("stanford-cars", description="Training data.")
    data_root: str | None = Field(
        None,
        description="Folder holding file-based datasets (mnist, stanford-cars, imagefolder). "
        "Unset: $LABCTL_DATA_DIR of the host that runs the job (/data in the containers).",
    )
    epochs: int = Field(30, ge=1, le=1000, description="Passes over the training split.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per step.")
    lr: float | None = Field(
        None, gt=0, le=10,
        description="Learning rate. Default depends on the optimizer: adam 1e-3, adamax 2e-3.",
    )
    betas: tuple[float, float] = Field((0.9, 0.999),
                                       description="Moment decay rates, each in [0, 1).")
    eps: float = Field(1e-8, gt=0, le=1, description="Numerical stabiliser.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Coupled L2 penalty, as torch.optim.")
    lr_schedule: LrSchedule = Field("cosine", description="constant, or cosine decay to 0.")
    warmup_epochs: int = Field(0, ge=0, le=100, description="Linear warm-up before the schedule.")
    image_size: int | None = Field(
        None, ge=8, le=1024,
        description="Side length images are resized to. Default: 224 for stanford-cars and "
        "imagefolder, the native size otherwise (digits 8, mnist 28, synthetic 32).",
    )
    num_classes: int | None = Field(
        None, ge=2, le=10000, description="Class count of the synthetic dataset (default 10).",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds every random generator.")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, cuda or cuda:N.")
    devices: int = Field(
        1, ge=1, le=MAX_DEVICES,
        description="Data-parallel ranks (resnet50 only): one GPU each on CUDA, one process "
        "each on the CPU; batch_size stays the global batch.")
    amp: bool = Field(False, description="bf16 autocast (resnet50 only).")
    channels_last: bool = Field(True, description="channels_last memory format (resnet50 only).")
    compile: bool = Field(False, description="torch.compile the model (resnet50 only).")
    init_weights: str | None = Field(
        None, description="torchvision-format checkpoint to start from (resnet50 only).",
    )
    crop_to_bbox: bool = Field(False, description="Crop Stanford Cars images to their box.")
    limit_train: int | None = Field(None, ge=1, le=10_000_000, description="Train subset size.")
    limit_test: int | None = Field(None, ge=1, le=10_000_000, description="Test subset size.")
    validation: float | None = Field(
        None, gt=0, le=0.5,
        description="Fraction of the training split held out (stratified, fixed seed) and "
        "evaluated instead of the test split, which the job then never reads: for tuning.")
    num_workers: int = Field(4, ge=0, le=64, description="DataLoader worker processes.")
    data_path: DataPath = Field(
        "auto", description="Photos (resnet50): cache decodes each image once and augments "
        "on the job's device; stream decodes JPEGs every epoch in DataLoader workers; auto "
        "caches unless the decoded data exceeds LABCTL_DATA_CACHE_MAX_GB.")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="A label for humans.")
    tags: list[str] = Field(default_factory=list, max_length=20, description="Free labels.",
                            json_schema_extra={"default": []})
    sweep_id: str | None = Field(None, pattern=NAME_PATTERN, description="Set by labctl sweep.")
    priority: Priority = Field(
        "normal", description="Queue priority: a waiting high job starts before normal and "
        "low ones (a running job is never interrupted).")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        for beta in betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError("each beta must be in [0, 1)")
        return betas

    @field_validator("tags")
    @classmethod
    def _tags_are_short_words(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not re.fullmatch(r"[A-Za-z0-9._:=-]{1,50}", tag):
                raise ValueError(f"tag {tag!r} must be 1-50 letters, digits or ._:=-")
        return tags

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobSpec:
        if self.model == "numpy-cnn":
            if self.device.startswith("cuda"):
                raise ValueError("device: numpy-cnn runs on the CPU only; use cpu or auto")
            if self.amp:
                raise ValueError("amp: applies to resnet50 only")
            # Only the torch ResNet50 loads a checkpoint; the NumPy CNN would ignore it.
            if self.init_weights:
                raise ValueError("init_weights: applies to resnet50 only")
            if self.devices > 1:
                raise ValueError("devices: numpy-cnn trains in one process; devices > 1 "
                                 "applies to resnet50 only")
        if self.data_path != "auto" and (self.model != "resnet50"
                                         or self.dataset not in PHOTO_DATASETS):
            raise ValueError("data_path: cache and stream apply to resnet50 on stanford-cars "
                             "or imagefolder")
        if self.devices > 1:
            if self.data_path == "cache":
                raise ValueError("data_path: a data-parallel job streams its photos (the "
                                 "decode-once cache feeds one device); use auto or stream")
            if self.batch_size % self.devices:
                raise ValueError(f"batch_size: {self.batch_size} is the global batch and "
                                 f"must split evenly over {self.devices} devices")
            if ":" in self.device:
                raise ValueError(f"device: {self.device} names one GPU; use cuda or auto with "
                                 "devices > 1 (rank r takes the r-th visible GPU)")
        if self.num_classes is not None and self.dataset != "synthetic":
            raise ValueError("num_classes: only the synthetic dataset takes a class count")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError("warmup_epochs: must be smaller than epochs")
        return self

    # Resolved values: the spec keeps ``None`` so a stored spec says what the user asked for.
    @property
    def effective_lr(self) -> float:
        """The rate given, else its recipe's for this optimizer, else Kingma & Ba's."""
        if self.lr is not None:
            return self.lr
        from labctl.shared.recipes import recipe_lr

        return (recipe_lr(self.model, self.dataset, self.optimizer)
                or DEFAULT_LR[self.optimizer])

    @property
    def evaluation_split(self) -> str:
        """What the job's ``test_*`` metrics are measured on."""
        return "test" if self.validation is None else "validation"

    @property
    def effective_image_size(self) -> int:
        return self.image_size or NATIVE_IMAGE_SIZE[self.dataset]

    @property
    def effective_num_classes(self) -> int | None:
        """Known before loading only for synthetic data; other datasets report theirs."""
        return (self.num_classes or 10) if self.dataset == "synthetic" else None


def resolve_data_root(spec: JobSpec, default: str | None) -> JobSpec:
    """Fill an unset ``data_root`` with the running host's default (its LABCTL_DATA_DIR).

    Resolved where the job runs, not where it was submitted: the data lives on the worker.
    """
    if spec.data_root or not default or spec.dataset not in FILE_DATASETS:
        return spec
    return spec.model_copy(update={"data_root": default})


def check_runtime(spec: JobSpec, allowed_data_dir: str | None = None) -> None:
    """Checks that need the host the job runs on. Raises :class:`SpecError`.

    ``allowed_data_dir``: when set (the worker), ``data_root`` and ``init_weights`` must
    resolve under it, so a queued spec cannot make a worker read arbitrary paths.
    """
    if spec.dataset in FILE_DATASETS:
        if not spec.data_root:
            raise SpecError("data_root", f"required for dataset {spec.dataset!r} "
                            "(pass --data-root or set LABCTL_DATA_DIR)")
        root = Path(spec.data_root).expanduser().resolve()
        if allowed_data_dir is not None:
            allowed = Path(allowed_data_dir).expanduser().resolve()
            if root != allowed and allowed not in root.parents:
                raise SpecError("data_root", f"{spec.data_root} is outside the worker's data "
                                f"directory {allowed}")
        if not root.is_dir():
            raise SpecError("data_root", f"{spec.data_root} does not exist or is not a folder")
    if spec.init_weights and allowed_data_dir is not None:
        weights = Path(spec.init_weights).expanduser().resolve()
        allowed = Path(allowed_data_dir).expanduser().resolve()
        if allowed not in weights.parents:
            raise SpecError("init_weights", f"{spec.init_weights} is outside the worker's data "
                            f"directory {allowed}")
    check_device(spec.device, spec.devices)


def check_device(device: str, devices: int = 1) -> None:
    """A ``cuda`` / ``cuda:N`` device must be present on this host, and ``devices`` of them
    for a data-parallel CUDA job. Raises :class:`SpecError`."""
    if device.startswith("cuda") or (device == "auto" and devices > 1):
        import torch  # deferred: importing torch costs a second and the CLI rarely needs it

        if device == "auto" and not torch.cuda.is_available():
            return  # auto on a host without CUDA: gloo ranks on the CPU
        if not torch.cuda.is_available():
            raise SpecError("device", f"{device} requested but no CUDA device is present")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise SpecError("device", f"{device} requested but only "
                            f"{torch.cuda.device_count()} CUDA device(s) are present")
        if devices > torch.cuda.device_count():
            raise SpecError("devices", f"{devices} GPUs requested but only "
                            f"{torch.cuda.device_count()} are visible here")


def first_error(exc: ValidationError) -> SpecError:
    """Turn pydantic's report into one line naming the field and the problem."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or None
    message = err["msg"].removeprefix("Value error, ")
    # Cross-field rules name their field as "field: problem".
    if field is None and ": " in message:
        field, message = message.split(": ", 1)
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    return SpecError(field, message)


def _takes_numbers(name: str) -> bool:
    field = JobSpec.model_fields.get(name)
    annotation = field.annotation if field else None
    return any(t in (int, float) for t in (get_args(annotation) or (annotation,)))


def build_spec(values: dict[str, Any]) -> JobSpec:
    """Validate a dict (from a file and/or flags) into a spec, or raise :class:`SpecError`."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(key, "must be a finite number")
        # pydantic's lax mode reads true as 1: `epochs: true` is a mistake, not one epoch.
        items = value if isinstance(value, list | tuple) else [value]
        if _takes_numbers(key) and any(isinstance(item, bool) for item in items):
            raise SpecError(key, f"expected a number, got {json.dumps(value)}")
    try:
        return JobSpec.model_validate(values)
    except ValidationError as exc:
        raise first_error(exc) from None


def load_spec_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON spec file into a dict (not yet validated)."""
    # Path("") is ".", which would be reported as a directory the user never named.
    if not os.fspath(path):
        raise SpecError(None, "spec file name is empty")
    p = Path(path)
    data = _parse_spec_text(_read_spec_text(p), p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(None, f"spec file {p} must hold a mapping of field: value")
    return data


def _read_spec_text(p: Path) -> str:
    """The file's text, refusing anything over the size cap.

    Reads at most one byte past the cap from the open file rather than trusting a stat:
    /dev/zero, /dev/urandom and pipes report size 0 and never end.
    """
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_SPEC_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(None, f"spec file {p} not found") from None
    except IsADirectoryError:
        raise SpecError(None, f"spec file {p} is a directory") from None
    except OSError as exc:
        raise SpecError(None, f"cannot read spec file {p}: {exc.strerror}") from None
    if len(raw) > MAX_SPEC_FILE_BYTES:
        raise SpecError(None, f"spec file {p} is larger than "
                        f"{MAX_SPEC_FILE_BYTES // (1 << 20)} MiB; a spec is a few lines")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(None, f"spec file {p} is not UTF-8 text") from None


def _parse_spec_text(text: str, p: Path) -> Any:
    """Parse YAML, or JSON for a ``.json`` file; every failure is one-line :class:`SpecError`."""
    kind = "JSON" if p.suffix == ".json" else "YAML"
    try:
        return (json.loads(text, object_pairs_hook=_mapping_without_repeats)
                if kind == "JSON" else yaml.load(text, Loader=_UniqueKeyLoader))  # noqa: S506
    except RepeatedKey as exc:
        raise SpecError(str(exc), f"set twice in spec file {p}") from None
    except UnbuildableNode as exc:
        raise SpecError(None, f"spec file {p} is not valid YAML "
                        f"(line {exc.line}: {exc.problem})") from None
    except RecursionError:
        # Both parsers recurse once per level; thousands of "[" exhaust Python's stack.
        raise SpecError(None, f"spec file {p} is not valid {kind} (nested too deeply)") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None) or exc
        line = getattr(where, "line", None)
        lineno = getattr(where, "lineno", None) or (line + 1 if line is not None else "?")
        raise SpecError(None, f"spec file {p} is not valid {kind} (line {lineno})") from None


class RepeatedKey(ValueError):
    pass


def _mapping_without_repeats(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """JSON and YAML both let a later key win silently; in a spec that hides a typo."""
    mapping: dict[Any, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise RepeatedKey(key)
        mapping[key] = value
    return mapping


class UnbuildableNode(ValueError):
    """YAML that parses but cannot become a value: a list as a key, a 13th month."""

    def __init__(self, node: yaml.Node, problem: str):
        self.line = node.start_mark.line + 1
        self.problem = problem
        super().__init__(f"line {self.line}: {problem}")


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_object(self, node, deep=False):
        # SafeLoader's scalar constructors raise bare ValueError (2020-13-45, !!int abc);
        # pin the failure to its line so the user can find it.
        try:
            return super().construct_object(node, deep=deep)
        except (RepeatedKey, UnbuildableNode):
            raise
        except ValueError as exc:
            raise UnbuildableNode(node, str(exc)) from None

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # YAML merge keys (<<: *base) still work
        pairs = [(self._construct_key(k, deep), self.construct_object(v, deep=deep))
                 for k, v in node.value]
        return _mapping_without_repeats(pairs)

    def _construct_key(self, node, deep):
        # A complex key (? [a, b]) builds a list, which a dict cannot hold.
        key = self.construct_object(node, deep=deep)
        if not isinstance(key, Hashable):
            raise UnbuildableNode(node, "a key must be a plain name, not a list or mapping")
        return key


def spec_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()

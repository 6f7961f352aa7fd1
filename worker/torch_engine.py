"""The PyTorch engine: our ResNet50 trained with Adam or AdaMax, driven by ``worker.runner``.

Shaped like torchvision's references/classification: ``train_one_epoch`` then ``evaluate``,
with the loop details that matter for speed on a GPU (channels_last, bf16 autocast, fused
optimizer steps, pinned memory, no host sync per batch) and for resumability on the CPU
(every RNG state, the shuffling generator's included, goes into the checkpoint).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from labctl.shared.artifacts import atomic_path
from labctl.shared.spec import PHOTO_DATASETS, JobSpec, SpecError
from labctl.worker.checkpoints import (
    CHECKPOINT_FORMATS,
    CHECKPOINT_NAMES,
    WEIGHTS_NAMES,
    CheckpointDamaged,
    read_torch,
)
from labctl.worker.data import build_torch_datasets, open_cached_splits
from labctl.worker.data.device_batches import DeviceBatches
from labctl.worker.engine import (
    BatchCallback,
    DataError,
    EvalResult,
    TrainingDiverged,
    TrainResult,
    seed_global_generators,
)
from labctl.worker.resnet import load_init_weights, resnet50
from labctl.worker.torch_optim import apply_schedule, build_optimizer, build_scheduler

CHECKPOINT_FORMAT = CHECKPOINT_FORMATS["resnet50"]
#: On a GPU, reading the loss back every batch would stall the launch queue; finiteness is
#: checked every this many batches instead (the first bad batch is still named exactly).
CUDA_LOSS_CHECK_EVERY = 25
#: Optimizer options that describe the kernel, not the state: they follow the device the job
#: resumes on, not the one the checkpoint was written on.
KERNEL_OPTIONS = ("fused", "foreach", "capturable", "differentiable")


def resolve_device(name: str) -> torch.device:
    """spec.device as a torch device; a CUDA device always gets its index, which
    ``torch.cuda.set_device`` requires."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def seed_all(seed: int) -> None:
    seed_global_generators(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def capture_rng_state(loader_generator: torch.Generator, cuda: bool) -> dict[str, Any]:
    """Every random stream the next epoch draws from, in a form ``torch.load(weights_only=
    True)`` accepts (NumPy's key array travels as a tensor)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else [],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
        "loader": loader_generator.get_state(),
    }


def restore_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() \
            and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32),
                                   "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    loader_generator.set_state(state["loader"])


def last_feature_map_side(image_size: int) -> int:
    """Side of ResNet50's last feature map: the stem (conv 7x7/2, max-pool 3x3/2) then three
    stride-2 stages, each rounding as the convolutions do."""
    side = (image_size + 2 * 3 - 7) // 2 + 1
    for _ in range(4):  # the max-pool, then layer2, layer3 and layer4
        side = (side + 2 - 3) // 2 + 1
    return side


def _check_batchnorm_can_train(spec: JobSpec, train_size: int) -> None:
    """BatchNorm in training mode needs more than one value per channel: one image whose
    last feature map is 1x1 has exactly one. Said before training, as the fix is the spec's."""
    size = spec.effective_image_size
    if last_feature_map_side(size) > 1:
        return
    if train_size == 1:
        raise DataError(f"the training split has one image, and ResNet50 at image_size {size} "
                        "cannot train on a batch of one; use more images or image_size >= 64")
    if spec.batch_size == 1:
        raise SpecError("batch_size", f"ResNet50 at image_size {size} cannot train on "
                        "batches of one image (BatchNorm would see one value per channel); "
                        "use --batch-size 2 or more, or --image-size 64 or more")


class TorchEngine:
    checkpoint_name = CHECKPOINT_NAMES["resnet50"]
    weights_name = WEIGHTS_NAMES["resnet50"]

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            torch.cuda.set_device(self.device)
            # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
            torch.backends.cudnn.benchmark = True
        seed_all(spec.seed)

        self.memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        # Its own generator: shuffling (and on the cached path, every crop and flip) depends
        # on the seed and the epoch alone, and its state is checkpointed, so a resumed job
        # sees the same batches as an uninterrupted one.
        self.loader_generator = torch.Generator().manual_seed(spec.seed)
        cached = open_cached_splits(spec, self.device)
        if cached is not None:
            self.data_path = "cache"
            self.class_names = list(cached.class_names)
            self.train_size, self.test_size = len(cached.train), len(cached.test)
            self._make_device_batches(cached)
        else:
            self.data_path = "stream" if spec.dataset in PHOTO_DATASETS else "memory"
            data = build_torch_datasets(spec)
            self.class_names = list(data.class_names)
            self.train_size, self.test_size = len(data.train), len(data.test)
            self._make_loaders(data)
        self.num_classes = len(self.class_names)
        _check_batchnorm_can_train(spec, self.train_size)

        model = resnet50(num_classes=self.num_classes)
        if spec.init_weights:
            load_init_weights(model, spec.init_weights, self.num_classes)
        self.model = model.to(self.device, memory_format=self.memory_format)
        # The compiled wrapper runs the steps; self.model stays the plain module whose
        # state_dict has torchvision's key names (the wrapper would prefix "_orig_mod.").
        self.runner_model = torch.compile(self.model) if spec.compile else self.model
        self.optimizer = build_optimizer(spec, self.model.parameters(), self.device)
        self.scheduler = build_scheduler(spec, self.optimizer)

    def _drop_last(self) -> bool:
        # A last batch of one image would make BatchNorm fail in training mode.
        return self.train_size % self.spec.batch_size == 1 and self.train_size > 1

    def _make_device_batches(self, cached) -> None:
        size, batch = self.spec.effective_image_size, self.spec.batch_size
        self.train_loader = DeviceBatches(cached.train, cached.train_labels, size, batch,
                                          train=True, generator=self.loader_generator,
                                          drop_last=self._drop_last(),
                                          memory_format=self.memory_format)
        self.test_loader = DeviceBatches(cached.test, cached.test_labels, size, batch,
                                         train=False, memory_format=self.memory_format)

    def _make_loaders(self, data) -> None:
        # More loader processes than cores only contend with the training threads.
        workers = min(self.spec.num_workers, os.cpu_count() or 1)
        loader_options: dict[str, Any] = {
            "batch_size": self.spec.batch_size, "num_workers": workers,
            "pin_memory": self.is_cuda, "persistent_workers": workers > 0 and self.is_cuda,
        }
        self.train_loader = DataLoader(data.train, shuffle=True, generator=self.loader_generator,
                                       drop_last=self._drop_last(), **loader_options)
        self.test_loader = DataLoader(data.test, shuffle=False, **loader_options)

    # -- the loop -------------------------------------------------------------------------

    def _autocast(self) -> AbstractContextManager:
        if not self.spec.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        # non_blocking: with pinned memory the copy overlaps the previous step's kernels.
        return (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                labels.to(self.device, non_blocking=True))

    @contextmanager
    def _explain_oom(self) -> Iterator[None]:
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            if self.is_cuda:
                torch.cuda.empty_cache()
            size = self.spec.batch_size
            raise RuntimeError(
                f"CUDA out of memory with batch_size={size}; try a smaller --batch-size, "
                f"e.g. --batch-size {max(1, size // 2)}") from None

    def train_one_epoch(self, epoch: int, on_batch: BatchCallback) -> TrainResult:
        self.runner_model.train()
        num_batches = len(self.train_loader)
        # Batch losses stay on the device and are read back in windows (see the constant).
        losses = torch.zeros(num_batches, device=self.device)
        batch_sizes = torch.zeros(num_batches)
        check_every = CUDA_LOSS_CHECK_EVERY if self.is_cuda else 1
        checked = 0
        started = time.perf_counter()
        with self._explain_oom():
            for index, (images, labels) in enumerate(self.train_loader):
                images, labels = self._to_device(images, labels)
                with self._autocast():
                    loss = F.cross_entropy(self.runner_model(images), labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses[index] = loss.detach()
                batch_sizes[index] = len(labels)
                if (index + 1) % check_every == 0 or index + 1 == num_batches:
                    self._check_finite(losses[checked:index + 1], epoch, first_batch=checked + 1)
                    checked = index + 1
                on_batch(index + 1, num_batches)
            if self.is_cuda:
                torch.cuda.synchronize(self.device)  # the timing covers the work, not its launch
        seconds = time.perf_counter() - started
        self.scheduler.step()
        images_seen = int(batch_sizes.sum())
        mean_loss = float((losses.cpu() * batch_sizes).sum()) / max(images_seen, 1)
        return TrainResult(loss=mean_loss, images=images_seen, seconds=seconds)

    @staticmethod
    def _check_finite(window: torch.Tensor, epoch: int, first_batch: int) -> None:
        finite = torch.isfinite(window)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise TrainingDiverged(epoch, first_batch + bad)

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        self.runner_model.eval()
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        top5_hits = torch.zeros((), dtype=torch.int64, device=self.device)
        predictions, truths = [], []
        with self._explain_oom():
            for images, labels in self.test_loader:
                images, labels = self._to_device(images, labels)
                with self._autocast():
                    logits = self.runner_model(images)
                logits = logits.float()
                total_loss += F.cross_entropy(logits, labels, reduction="sum")
                predictions.append(logits.argmax(dim=1))
                truths.append(labels)
                if self.num_classes > 5:
                    top5 = logits.topk(5, dim=1).indices
                    top5_hits += (top5 == labels[:, None]).any(dim=1).sum()
        y_pred = torch.cat(predictions).cpu().numpy().astype(np.int64)
        y_true = torch.cat(truths).cpu().numpy().astype(np.int64)
        count = max(len(y_true), 1)
        return EvalResult(loss=float(total_loss) / count, y_true=y_true, y_pred=y_pred,
                          top5=float(top5_hits) / count if self.num_classes > 5 else None)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- state ------------------------------------------------------------------------------

    def save_checkpoint(self, path: Path, epoch: int, spec: dict) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "spec": spec,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling; kept for the format's sake
            "rng": capture_rng_state(self.loader_generator, cuda=self.is_cuda),
        }
        with atomic_path(Path(path)) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, path: Path) -> int:
        """Restore the state; returns the epoch as stored (the runner checks its range).
        Raises :class:`CheckpointDamaged` for a file that is no checkpoint of this job."""
        state = read_torch(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointDamaged(path, f"not a {CHECKPOINT_FORMAT} checkpoint")
        if state.get("num_classes") != self.num_classes:
            raise DataError(f"checkpoint {path} has {state.get('num_classes')} classes, the "
                            f"data {self.num_classes}")
        try:
            self.model.load_state_dict(state["model"])
            self._load_optimizer_state(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            apply_schedule(self.scheduler)
            restore_rng_state(state["rng"], self.loader_generator)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            # RuntimeError: load_state_dict's missing or mis-shaped tensors.
            raise CheckpointDamaged(path, "it does not fit this network: "
                                          f"{str(exc).splitlines()[0][:200]}") from None
        return state.get("epoch")

    def _load_optimizer_state(self, saved: dict) -> None:
        """Load the optimizer's moments but keep this device's kernel choice: a checkpoint
        written on the CPU may resume with fused Adam on a GPU, and the other way round."""
        kernel = [{k: g[k] for k in KERNEL_OPTIONS if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, options in zip(self.optimizer.param_groups, kernel, strict=True):
            group.update(options)
            # Fused and capturable kernels keep the step count on the parameter's device,
            # the others on the CPU; load_state_dict placed it by the saved options.
            on_device = bool(group.get("fused") or group.get("capturable"))
            for param in group["params"]:
                param_state = self.optimizer.state.get(param, {})
                step = param_state.get("step")
                if isinstance(step, torch.Tensor):
                    param_state["step"] = step.to(param.device if on_device else "cpu",
                                                  torch.float32)

    def save_weights(self, path: Path) -> None:
        """A bare torchvision-format state_dict on the CPU: loads into torchvision's resnet50
        and is a valid ``init_weights`` for a later job."""
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(Path(path)) as tmp:
            torch.save(weights, tmp)

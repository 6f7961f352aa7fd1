"""One rank of a data-parallel ResNet50 job: a child process that trains its share of each
global batch under DistributedDataParallel and answers the commands of its parent's
:class:`labctl.worker.ddp_launcher.DistributedEngine`.

A rank never touches the job folder's records: the parent runs the same runner as a
one-device job and asks rank 0 for the tensors (the checkpoint and the final weights),
which rank 0 writes with the one-device engine's own code. A rank stops at its next batch
once the parent sets the shared stop event, and exits at once (without a collective) on
any error, so its peers' collectives fail fast instead of waiting for the timeout.
"""

from __future__ import annotations

import ctypes
import os
import signal
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from labctl.shared.spec import PHOTO_DATASETS, JobSpec, SpecError, build_spec
from labctl.worker.checkpoints import CheckpointDamaged
from labctl.worker.engine import BatchCallback, DataError, EvalResult, TrainingDiverged, TrainResult
from labctl.worker.torch_engine import TorchEngine

#: prctl(2) option: the signal this process gets when the thread that started it exits.
PR_SET_PDEATHSIG = 1


class RanksStopped(Exception):  # noqa: N818 - a control-flow signal
    """The parent asked every rank to stop (cancel, hand-back, a peer's death)."""


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a dataset of ``size``: every index on exactly
    one rank, no padding (DistributedSampler pads with repeats so ranks get equal counts,
    which would count some test images twice)."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = range(rank, size, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def rank_device(spec: JobSpec, rank: int) -> torch.device:
    """The r-th visible GPU for a CUDA job (``labctl worker --gpus`` sets which are
    visible), else the CPU."""
    wants_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda", rank) if wants_cuda else torch.device("cpu")


class RankEngine(TorchEngine):
    """The one-device engine with its loaders sharded and its model wrapped in DDP."""

    def __init__(self, spec: JobSpec, rank: int, world: int, stop: Any, progress: Any):
        self.rank, self.world = rank, world
        self.stop, self.progress = stop, progress
        device = rank_device(spec, rank)
        # The engine builds its loaders with the spec's batch: each rank's is its share.
        update: dict[str, Any] = {"device": str(device), "batch_size": spec.batch_size // world}
        if spec.dataset in PHOTO_DATASETS:
            # Sharding re-wraps DataLoaders; the decode-once path's device batches are one
            # device's, so a data-parallel job streams its photos.
            update["data_path"] = "stream"
        super().__init__(spec.model_copy(update=update))
        self.global_spec = spec
        self._shard_loaders()
        # DDP broadcasts rank 0's initial weights, so every rank starts from the same model.
        self.ddp = DistributedDataParallel(
            self.model, device_ids=[self.device] if self.is_cuda else None)
        self.runner_model = torch.compile(self.ddp) if spec.compile else self.ddp

    def _shard_loaders(self) -> None:
        train, test = self.train_loader.dataset, self.test_loader.dataset
        per_rank = self.spec.batch_size
        options: dict[str, Any] = {
            "batch_size": per_rank, "num_workers": self.train_loader.num_workers,
            "pin_memory": self.is_cuda,
            "persistent_workers": self.train_loader.persistent_workers}
        # Reseeded per epoch by set_epoch: the shuffle depends on (seed, epoch) alone, so a
        # resumed job, whatever its device count, sees each epoch's permutation once.
        self.train_sampler = DistributedSampler(train, num_replicas=self.world, rank=self.rank,
                                                shuffle=True, seed=self.global_spec.seed)
        shard = len(self.train_sampler)
        self.train_loader = DataLoader(
            train, sampler=self.train_sampler,
            # Every rank has the same shard length, so they drop the same last batch.
            drop_last=shard % per_rank == 1 and shard > 1, **options)
        self.test_loader = DataLoader(test, sampler=ShardSampler(len(test), self.rank,
                                                                 self.world), **options)

    def train_one_epoch(self, epoch: int, on_batch: BatchCallback) -> TrainResult:
        self.train_sampler.set_epoch(epoch)

        def relay(batch: int, num_batches: int) -> None:
            if self.stop.is_set():
                raise RanksStopped()
            if self.rank == 0:
                self.progress[0], self.progress[1] = batch, num_batches

        result = super().train_one_epoch(epoch, relay)
        totals = torch.tensor([result.loss * result.images, float(result.images)],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        seconds = torch.tensor([result.seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        images = int(totals[1])
        # The slowest rank's time: every image of the global batches was seen by then.
        return TrainResult(loss=float(totals[0]) / max(images, 1), images=images,
                           seconds=float(seconds))

    def evaluate(self) -> EvalResult | None:
        """This rank's shard, gathered on rank 0 in the test split's order; None elsewhere."""
        # The plain module: shards differ in length, and DDP's forward may sync buffers.
        wrapped, self.runner_model = self.runner_model, self.model
        try:
            part = super().evaluate()
        finally:
            self.runner_model = wrapped
        count = len(part.y_true)
        mine = (count, part.loss * count, (part.top5 or 0.0) * count, part.y_true, part.y_pred)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, mine)
        if self.rank != 0:
            return None
        total = sum(p[0] for p in parts)
        y_true, y_pred = np.empty(total, np.int64), np.empty(total, np.int64)
        for rank, (_, _, _, truth, predicted) in enumerate(parts):
            y_true[rank::self.world], y_pred[rank::self.world] = truth, predicted
        return EvalResult(loss=sum(p[1] for p in parts) / max(total, 1), y_true=y_true,
                          y_pred=y_pred,
                          top5=sum(p[2] for p in parts) / max(total, 1)
                          if part.top5 is not None else None)

    def save_checkpoint(self, path: Path, epoch: int, spec: dict) -> None:
        if self.rank == 0:  # the unwrapped module's state: resumable on any device count
            super().save_checkpoint(path, epoch, spec)

    def save_weights(self, path: Path) -> None:
        if self.rank == 0:
            super().save_weights(path)

    def describe(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names,
                "train_size": self.train_size, "test_size": self.test_size}


def encode_error(exc: BaseException) -> tuple[str, Any]:
    """An exception as (kind, fields) the parent rebuilds: the runner's handling of a
    one-device job's error depends on its class."""
    if isinstance(exc, CheckpointDamaged):
        return "checkpoint", (str(exc.path), exc.why)
    if isinstance(exc, SpecError):
        return "spec", (exc.field, exc.problem)
    if isinstance(exc, DataError):
        return "data", str(exc)
    if isinstance(exc, TrainingDiverged):
        why = str(exc).split(": ", 1)[1] if ": " in str(exc) else "loss is NaN or inf"
        return "diverged", (exc.epoch, exc.batch, why)
    return "crash", (f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}"
                     if str(exc).strip() else type(exc).__name__, traceback.format_exc())


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the thread that started it dies (the worker SIGKILLed
    or crashed), so no orphan keeps training. Elsewhere the per-batch parent check does."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def rank_main(rank: int, world: int, spec_values: dict[str, Any], address: str, conn: Any,
              stop: Any, progress: Any, timeout_seconds: float, parent_pid: int) -> None:
    """A rank's whole life: join the group, build the engine, serve commands until "close"."""
    _die_with_parent()
    # Ctrl-C reaches the whole foreground process group: only the parent acts on it, and
    # relays the stop through the event.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        spec = build_spec(spec_values)
        device = rank_device(spec, rank)
        if device.type == "cpu":
            # The ranks share the host's cores; more threads than that only contend.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank,
            world_size=world,
            # A collective waiting on a peer that hangs raises after this, never waits forever.
            timeout=timedelta(seconds=timeout_seconds))
        engine = RankEngine(spec, rank, world, stop, progress)
        conn.send(("ok", engine.describe()))
        while True:
            command, args = conn.recv()
            if command == "close":
                break
            if os.getppid() != parent_pid:
                raise RuntimeError("the worker that started this rank is gone")
            conn.send(("ok", getattr(engine, command)(*args)))
    except RanksStopped:
        _send(conn, ("stopped", None))
        os._exit(0)  # no collective: the peers are stopping too
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent
        _send(conn, ("error", encode_error(exc)))
        os._exit(1)  # at once: the peers' collectives then fail instead of timing out
    dist.destroy_process_group()
    conn.close()


def _send(conn: Any, message: tuple) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):  # the parent is gone or closed the pipe
        pass

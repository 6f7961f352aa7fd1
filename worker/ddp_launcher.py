"""A data-parallel ResNet50 job as one :class:`labctl.worker.engine.Engine`: N rank
processes (``worker/ddp_rank.py``) under DistributedDataParallel, driven from the process
that runs the job.

Why ``torch.multiprocessing`` spawn and not torchrun: the process that runs the job (a
worker's task, or ``labctl run``) must stay its one owner. It holds the Redis lease and the
heartbeat, the folder lock, the cancel and hand-back flags; the ranks are its children,
which it can stop, kill and outlive. torchrun would make its elastic launcher the parent of
the training and the job's owner, and restart ranks on its own terms. Spawn, not fork: the
worker process has threads (consumer, heartbeat, reaper) and may hold CUDA state.

The runner drives this engine exactly as a one-device one, so rows, checkpoints, plots,
summary and status go through the same code; rank 0 writes the tensors (checkpoint,
weights). While the ranks train, the parent relays their progress to the runner's batch
callback, which is where a cancel or a hand-back is raised: it then sets the stop event
each rank checks before every batch, so all ranks stop within one batch. A rank that dies
or fails stops the whole job: the others are killed and the error is raised here
(:class:`RankLost` for a rank killed by a signal, which the worker hands back; the rank's
own error otherwise, which fails the job as it would on one device).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from labctl.shared.settings import get_settings
from labctl.shared.spec import JobSpec, SpecError
from labctl.worker.checkpoints import CHECKPOINT_NAMES, WEIGHTS_NAMES, CheckpointDamaged
from labctl.worker.ddp_rank import rank_main
from labctl.worker.engine import (
    BatchCallback,
    DataError,
    EvalResult,
    RankLost,
    TrainingDiverged,
    TrainResult,
)

log = logging.getLogger(__name__)

#: How often the parent looks at its ranks while it waits for their answers.
POLL_SECONDS = 0.1
#: After a failure, how long the parent listens for the other ranks' messages and deaths
#: before it kills them: a rank killed by a signal makes its peers' collectives fail, and
#: the job must be reported by the death (handed back), not by the peers' errors.
SETTLE_SECONDS = 1.0
#: How long stopped or closed ranks get to exit before they are killed.
EXIT_GRACE_SECONDS = 10.0


def free_local_port() -> int:
    """A port for the ranks' rendezvous (the OS picks one nobody listens on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RankFailed(RuntimeError):
    """A rank raised an error the runner treats as a crash; the message names the rank."""


def rebuild_error(rank: int, kind: str, fields: Any) -> Exception:
    """The exception a rank reported (``ddp_rank.encode_error``), as its own class."""
    if kind == "checkpoint":
        return CheckpointDamaged(*fields)
    if kind == "spec":
        return SpecError(*fields)
    if kind == "data":
        return DataError(fields)
    if kind == "diverged":
        return TrainingDiverged(*fields)
    message, trace = fields
    log.error("rank %d failed:\n%s", rank, trace)
    return RankFailed(f"rank {rank}: {message}")


class DistributedEngine:
    checkpoint_name = CHECKPOINT_NAMES["resnet50"]
    weights_name = WEIGHTS_NAMES["resnet50"]

    def __init__(self, spec: JobSpec):
        self.spec, self.world = spec, spec.devices
        context = mp.get_context("spawn")
        self.stop = context.Event()
        self.progress = context.Array("i", 2)  # rank 0's (batch, batches) in this epoch
        address = f"tcp://127.0.0.1:{free_local_port()}"
        timeout = get_settings().distributed_timeout_seconds
        self.ranks: list[Any] = []
        self.conns: list[Any] = []
        try:
            for rank in range(self.world):
                parent_end, child_end = context.Pipe()
                # Not daemonic: a daemonic process may not start DataLoader workers. The
                # rank kills itself if this process dies (see ddp_rank._die_with_parent).
                process = context.Process(
                    target=rank_main, name=f"labctl-rank-{rank}",
                    args=(rank, self.world, spec.model_dump(mode="json"), address, child_end,
                          self.stop, self.progress, timeout, os.getpid()))
                process.start()
                child_end.close()
                self.ranks.append(process)
                self.conns.append(parent_end)
            info = self._wait()[0]
        except BaseException:
            self._kill_all()
            raise
        self.num_classes, self.class_names = info["num_classes"], info["class_names"]
        self.train_size, self.test_size = info["train_size"], info["test_size"]
        self._lr: float | None = None
        log.info("data-parallel job: %d ranks (pids %s)", self.world,
                 ", ".join(str(p.pid) for p in self.ranks))

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.ranks]

    # --- the Engine protocol ---------------------------------------------------------------

    def train_one_epoch(self, epoch: int, on_batch: BatchCallback) -> TrainResult:
        self.progress[0] = 0
        # The ranks' batch callback is the stop event; the runner's runs here (see _wait).
        return self._call("train_one_epoch", epoch, None, on_batch=on_batch)[0]

    def evaluate(self) -> EvalResult:
        return self._call("evaluate")[0]

    def current_lr(self) -> float:
        return float(self._call("current_lr")[0])

    def save_checkpoint(self, path: Path, epoch: int, spec: dict) -> None:
        self._call("save_checkpoint", Path(path), epoch, spec)

    def load_checkpoint(self, path: Path) -> int:
        return self._call("load_checkpoint", Path(path))[0]

    def save_weights(self, path: Path) -> None:
        self._call("save_weights", Path(path))

    def close(self) -> None:
        """End the ranks (idempotent): a clean exit if they are idle, at their next batch
        if they still train (an interrupt that came between two batches), else a kill."""
        self.stop.set()
        for conn, process in zip(self.conns, self.ranks, strict=True):
            if process.is_alive():
                try:
                    conn.send(("close", ()))
                except (OSError, ValueError):
                    pass
        self._join_or_kill(EXIT_GRACE_SECONDS)

    # --- talking to the ranks --------------------------------------------------------------

    def _call(self, command: str, *args: Any, on_batch: BatchCallback | None = None
              ) -> list[Any]:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((command, args))
            except OSError:  # BrokenPipeError: the rank died after its last answer
                self._fail(rank, None)
        return self._wait(on_batch)

    def _wait(self, on_batch: BatchCallback | None = None) -> list[Any]:
        """Every rank's answer, in rank order. Meanwhile: the runner's batch callback at
        each new batch (it may raise: the ranks are then stopped), and a watch on the
        ranks (any death or error stops the job)."""
        answers: dict[int, Any] = {}
        seen_batch = 0
        while len(answers) < self.world:
            for rank, conn in enumerate(self.conns):
                if rank in answers or not conn.poll(0 if answers else POLL_SECONDS / self.world):
                    continue
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    self._fail(rank, None)
                if status != "ok":
                    self._fail(rank, (status, value))
                answers[rank] = value
            for rank, process in enumerate(self.ranks):
                if rank not in answers and not process.is_alive() \
                        and not self.conns[rank].poll():
                    self._fail(rank, None)
            batch, batches = self.progress[0], self.progress[1]
            if on_batch is not None and batch != seen_batch:
                seen_batch = batch
                try:
                    on_batch(batch, batches)
                except BaseException:  # cancel, hand-back, Ctrl-C: every rank stops
                    self.stop.set()
                    self._join_or_kill(EXIT_GRACE_SECONDS)
                    raise
        return [answers[rank] for rank in range(self.world)]

    def _fail(self, rank: int, message: tuple[str, Any] | None) -> None:
        """A rank died or reported an error: settle what happened, kill the rest, raise."""
        errors: dict[int, tuple[str, Any]] = {}
        if message is not None and message[0] == "error":
            errors[rank] = message[1]
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            for other, conn in enumerate(self.conns):
                try:
                    if other not in errors and conn.poll():
                        status, value = conn.recv()
                        if status == "error":
                            errors[other] = value
                except (EOFError, OSError):
                    continue
            time.sleep(POLL_SECONDS / 2)
        killed = {r: -p.exitcode for r, p in enumerate(self.ranks)
                  if p.exitcode is not None and p.exitcode < 0}
        self._kill_all()
        if killed:  # the cause; its peers' errors are only its echo
            dead, signum = next(iter(killed.items()))
            raise RankLost(f"rank {dead} of {self.world} was killed by "
                           f"{signal.Signals(signum).name}")
        for kind in ("checkpoint", "spec", "data", "diverged", "crash"):
            for failed, (got_kind, fields) in sorted(errors.items()):
                if got_kind == kind:
                    raise rebuild_error(failed, kind, fields)
        code = self.ranks[rank].exitcode
        raise RankLost(f"rank {rank} of {self.world} exited with code {code} and no error")

    def _join_or_kill(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for process in self.ranks:
            process.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()

    def _kill_all(self) -> None:
        for process in self.ranks:
            if process.is_alive():
                process.kill()
        for process in self.ranks:
            process.join(5)

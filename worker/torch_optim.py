"""Optimizer and learning-rate schedule for the torch engine, built from a :class:`JobSpec`."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from labctl.shared.spec import JobSpec
from labctl.worker.schedule import lr_factor

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
}


def _kernel_options(cls: type[torch.optim.Optimizer], device: torch.device) -> dict[str, bool]:
    """The fastest update implementation this optimizer offers on ``device``.

    fused (one kernel for the whole parameter list) exists for Adam on CUDA; foreach (a few
    multi-tensor kernels) for both. On the CPU the defaults are already the best choice and
    the per-parameter loop keeps the arithmetic order identical across runs.
    """
    if device.type != "cuda":
        return {}
    accepted = inspect.signature(cls).parameters
    if "fused" in accepted:
        return {"fused": True}
    if "foreach" in accepted:
        return {"foreach": True}
    return {}


def build_optimizer(spec: JobSpec, params: Iterable[torch.nn.Parameter],
                    device: torch.device) -> torch.optim.Optimizer:
    cls = OPTIMIZERS[spec.optimizer]
    return cls(params, lr=spec.effective_lr, betas=spec.betas, eps=spec.eps,
               weight_decay=spec.weight_decay, **_kernel_options(cls, device))



def build_scheduler(spec: JobSpec, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """Stepped once per epoch; the rate during epoch e (1-based) is base * factor(e - 1).

    The factor is a closure on purpose: LambdaLR leaves plain functions out of its
    state_dict, so a resumed job follows the schedule of the spec it is resumed with (e.g.
    more epochs) rather than the one stored in the checkpoint.
    """
    epochs, warmup, schedule = spec.epochs, spec.warmup_epochs, spec.lr_schedule
    return LambdaLR(optimizer, lambda epoch_index: lr_factor(epoch_index, epochs, warmup,
                                                             schedule))


def apply_schedule(scheduler: LambdaLR) -> None:
    """Set each group's rate from the scheduler's current epoch, after loading a checkpoint
    (the optimizer state carries the rate of the schedule it was saved under)."""
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                      scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(scheduler.last_epoch)

"""Data parallel on this CPU: 2 gloo ranks against 1 process, the same global batch.

Both train our ResNet50 through the engines a job uses (``TorchEngine`` for one device,
``DistributedEngine`` for ``--devices 2``) on synthetic images; the speed is the training
images/s of the second epoch (the first warms the allocator and the caches), summed over
the ranks as a job's metrics report it. Start-up (spawning the ranks, importing torch in
each) is left out: a job pays it once.

On a CPU this is a correctness path, not a speed-up: the two ranks split the same cores
the single process uses, and each step adds an all-reduce of ResNet50's 25.6M gradients
through gloo. It exists so that the DDP code paths run and are tested without a GPU; on
GPUs (NCCL, one GPU per rank) ``scripts/gpu-check`` measures the scaling.

    python -m labctl.bench.ddp_throughput            # ~2 minutes on 2 cores; updates the docs
    python -m labctl.bench.ddp_throughput --no-write --images 64
    python -m labctl.bench.ddp_throughput --device cuda --no-write   # scripts/gpu-check:
        # 1..N NCCL ranks (one per visible GPU), each through DDP, the same global batch
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from labctl.bench.docs_page import BENCHMARKS_PAGE, write_section
from labctl.shared.spec import build_spec

DOC = BENCHMARKS_PAGE
SECTION = "ddp"


def spec_for(devices: int, images: int, batch: int, size: int, device: str = "cpu"):
    return build_spec({"model": "resnet50", "dataset": "synthetic", "image_size": size,
                       "limit_train": images, "limit_test": batch, "batch_size": batch,
                       "epochs": 2, "num_workers": 0, "device": device, "devices": devices,
                       "lr_schedule": "constant", "amp": device == "cuda"})


def images_per_second(devices: int, images: int, batch: int, size: int,
                      device: str = "cpu", ddp: bool = False) -> float:
    """``ddp``: one rank goes through DDP too (NCCL's 1-rank baseline on one GPU)."""
    spec = spec_for(devices, images, batch, size, device)
    if devices == 1 and not ddp:
        from labctl.worker.torch_engine import TorchEngine

        engine = TorchEngine(spec)
        close = None
    else:
        from labctl.worker.ddp_launcher import DistributedEngine

        engine = DistributedEngine(spec)
        close = engine.close
    try:
        engine.train_one_epoch(1, lambda batch, batches: None)  # warm-up
        result = engine.train_one_epoch(2, lambda batch, batches: None)
    finally:
        if close is not None:
            close()
    return result.images / result.seconds


def render(one: float, one_thread: float, two: float, images: int, batch: int, size: int,
           load: float) -> str:
    cpu = platform.processor() or platform.machine()
    caveat = ([f"Here the 2 ranks came out faster: the machine was busy (load average "
               f"{load:.1f} on {os.cpu_count()} cores), where one process's OpenMP threads "
               "wait on each other and stall; the 1-thread row is the fair per-core figure. "
               "That is the machine, not DDP."] if two > one else [])
    return "\n".join([
        "## Data parallel on the CPU: 2 gloo ranks vs 1 process",
        "",
        f"`python -m labctl.bench.ddp_throughput`: ResNet50 training on {images} synthetic "
        f"images at {size}x{size}, global batch {batch} (2 ranks: {batch // 2} each), "
        f"{os.cpu_count()} cores on {cpu}, torch {torch.__version__}; images/s of the "
        "second epoch, summed over the ranks.",
        "",
        "| set-up | images/s | vs 1 process |",
        "| --- | ---: | ---: |",
        f"| 1 process, all cores | {one:.1f} | 1.00 |",
        f"| 1 process, 1 thread | {one_thread:.1f} | {one_thread / one:.2f} |",
        f"| 2 gloo ranks, half the cores each | {two:.1f} | {two / one:.2f} |",
        "",
        "A correctness path, not a speed-up: on one CPU the ranks share the cores the single "
        "process had, and every step adds a gloo all-reduce of 25.6M gradients. "
        "`--devices N` pays off on N GPUs (NCCL); `scripts/gpu-check` measures that.",
        *([""] + caveat if caveat else []),
    ])


def cuda_scaling(images: int, batch: int, size: int) -> int:
    """Training images/s of 1..N NCCL ranks (all through DDP), the same global batch."""
    gpus = torch.cuda.device_count()
    if not gpus:
        print("no CUDA device: nothing to measure")
        return 1
    print("| ranks (GPUs) | images/s | vs 1 rank |\n| ---: | ---: | ---: |")
    base = None
    for ranks in range(1, gpus + 1):
        if batch % ranks:
            continue
        speed = images_per_second(ranks, images, batch, size, "cuda", ddp=True)
        base = base or speed
        print(f"| {ranks} | {speed:.0f} | {speed / base:.2f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: NCCL ranks on 1..N visible GPUs, printed only")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return cuda_scaling(args.images, args.batch, args.size)
    load = os.getloadavg()[0]
    one = images_per_second(1, args.images, args.batch, args.size)
    print(f"1 process: {one:.1f} img/s", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = images_per_second(1, args.images, args.batch, args.size)
    torch.set_num_threads(threads)
    print(f"1 process, 1 thread: {one_thread:.1f} img/s", flush=True)
    two = images_per_second(2, args.images, args.batch, args.size)
    print(f"2 gloo ranks: {two:.1f} img/s", flush=True)
    load = max(load, os.getloadavg()[0])
    table = render(one, one_thread, two, args.images, args.batch, args.size, load)
    print(table)
    if not args.no_write:
        write_section(DOC, SECTION, table)
        print(f"wrote the {SECTION} section of {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

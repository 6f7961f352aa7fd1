"""Measurements for a lent GPU (run by ``scripts/gpu-check``): ResNet50 training speed and
memory on synthetic 224x224 batches (ours and torchvision's, torch.compile off and on), then
a whole Stanford-Cars-sized epoch on the engine's default data path: 8,144 generated JPEGs
decoded once into the uint8 cache, put on the GPU, augmented there in batches
(worker/data/device_batches.py), trained, and evaluated on 8,041 test images.

    python -m bench.gpu_check --out "$OUT"        # ~3-4 minutes on an H200
    python -m bench.gpu_check --dry-run           # every row on the CPU at toy sizes

Prints one markdown table, writes it (and the raw numbers as JSON) under ``--out`` and into
the ``gpu`` section of docs/benchmarks.md (``--doc``; a dry run writes a page only when
given one). Each row is measured on its own: one that fails says why and the others run.
Needs torch, torchvision, numpy and pillow only (no pydantic), so it runs on a bare image.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

from labctl.bench.docs_page import BENCHMARKS_PAGE, write_section
from labctl.bench.photos import write_photos
from labctl.worker.resnet import resnet50

STANFORD_CARS_TRAIN = 8144
STANFORD_CARS_TEST = 8041
STANFORD_CARS_CLASSES = 196
#: The project's goals on an H200: bf16 + channels_last training, and one whole epoch with
#: its evaluation.
TARGET_IMAGES_PER_SECOND = 6000
TARGET_EPOCH_SECONDS = 2.0
SECTION = "gpu"


#: "cuda", or "cpu" for ``--cpu-dry-run``: every code path on tiny sizes, so a broken script
#: is found on a laptop instead of costing a GPU lease.
DEVICE = "cuda"


def on_cuda() -> bool:
    return DEVICE == "cuda"


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if on_cuda() else None


class Trainer:
    """The torch engine's per-batch work (worker/torch_engine.py) on a fresh ResNet50."""

    def __init__(self, amp: bool, channels_last: bool, compile_model: bool,
                 model: str = "ours"):
        torch.manual_seed(0)
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        build = resnet50 if model == "ours" else torchvision.models.resnet50
        self.model = build(num_classes=STANFORD_CARS_CLASSES).to(
            DEVICE, memory_format=self.format).train()
        # The dry run checks the compile step's wiring, not inductor's code generation
        # (minutes of C++ compiling on a CPU).
        backend = "inductor" if on_cuda() else "eager"
        self.forward = torch.compile(self.model, backend=backend) if compile_model \
            else self.model
        # The spec's default optimizer; AdaMax has no fused kernel, foreach is the engine's.
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=2e-3, foreach=True)
        self.amp = amp
        self.losses: list[torch.Tensor] = []

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(DEVICE, non_blocking=True, memory_format=self.format)
        labels = labels.to(DEVICE, non_blocking=True)
        autocast = torch.autocast(DEVICE, dtype=torch.bfloat16) if self.amp else nullcontext()
        with autocast:
            loss = F.cross_entropy(self.forward(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.detach())

    def all_finite(self) -> bool:
        return bool(torch.isfinite(torch.stack(self.losses)).all()) if self.losses else True


def synthetic_throughput(amp: bool, channels_last: bool, compile_model: bool, batch: int,
                         size: int, steps: int, warmup: int, model: str = "ours") -> dict:
    free_memory()
    trainer = Trainer(amp, channels_last, compile_model, model)
    images = torch.randn(batch, 3, size, size, device=DEVICE)
    labels = torch.randint(0, STANFORD_CARS_CLASSES, (batch,), device=DEVICE)
    started = time.perf_counter()
    for _ in range(warmup):  # cuDNN autotuning, the compile, the optimizer's state
        trainer.step(images, labels)
    sync()
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step(images, labels)
    sync()
    seconds = time.perf_counter() - started
    result = {"images_per_s": batch * steps / seconds, "peak_gib": peak_gib(),
              "warmup_s": warmup_s, "finite": trainer.all_finite()}
    del trainer
    return result


# -- the Stanford-Cars-sized epoch ---------------------------------------------------------

def timed_epoch(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                step: Callable[[torch.Tensor, torch.Tensor], None] | None) -> tuple[int, float]:
    """Images and seconds for one pass; ``step=None`` times the input pipeline alone."""
    started = time.perf_counter()
    count = 0
    for images, labels in batches:
        if step is not None:
            step(images, labels)
        count += len(labels)
    sync()
    return count, time.perf_counter() - started


@torch.no_grad()
def evaluate(trainer: Trainer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The engine's evaluation: eval mode, bf16 autocast, predictions kept on the device."""
    trainer.model.eval()
    hits = torch.zeros((), dtype=torch.int64, device=DEVICE)
    for images, labels in batches:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = trainer.forward(images)
        hits += (logits.argmax(dim=1) == labels).sum()
    trainer.model.train()
    return int(hits)


def pipeline_rows(args: argparse.Namespace) -> list[tuple[str, dict]]:
    from labctl.worker.data.cache import decode_images
    from labctl.worker.data.device_batches import DeviceBatches, DeviceImages
    from labctl.worker.data.samples import ImageSamples
    from labctl.worker.data.torch_datasets import ImageFileDataset
    from labctl.worker.data.transforms import resize_size, train_transform

    rows: list[tuple[str, dict]] = []
    folder = Path(tempfile.mkdtemp(prefix="labctl-cars-"))
    try:
        started = time.perf_counter()
        train_paths, train_labels = write_photos(folder / "train", args.images,
                                                 STANFORD_CARS_CLASSES, seed=0)
        test_paths, test_labels = write_photos(folder / "test", args.test_images,
                                               STANFORD_CARS_CLASSES, seed=1)
        print(f"wrote {len(train_paths) + len(test_paths)} JPEGs in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
        train = ImageSamples(train_paths, train_labels)
        test = ImageSamples(test_paths, test_labels)
        short, device = resize_size(args.size), torch.device(DEVICE)
        state: dict = {}

        def decode_once() -> dict:
            started = time.perf_counter()
            decoded = [decode_images(s, short, folder / "cache") for s in (train, test)]
            seconds = time.perf_counter() - started
            state["images"] = [DeviceImages.from_decoded(d, device) for d in decoded]
            sync()
            gib = sum(i.nbytes for i in state["images"]) / 2**30
            return {"images_per_s": (len(train) + len(test)) / seconds, "epoch_s": seconds,
                    "note": f"{len(train)} + {len(test)} JPEGs, {os.cpu_count()} threads; "
                            f"{gib:.2f} GiB of uint8 on {DEVICE}; once per dataset"}

        rows.append(("decode once into the uint8 cache, copy to the device",
                     measured(decode_once)))
        if "images" not in state:
            return rows

        def batches(train_split: bool) -> DeviceBatches:
            images, labels = (state["images"][0], train_labels) if train_split else (
                state["images"][1], test_labels)
            return DeviceBatches(images, labels, args.size, args.batch, train=train_split,
                                 generator=torch.Generator().manual_seed(0))

        rows.append(("data path alone: cached crops/flips/normalise on the device",
                     measured(lambda: epoch_result(*timed_epoch(batches(True), None)))))

        def loader_alone() -> dict:
            loader = DataLoader(ImageFileDataset(train, train_transform(args.size)),
                                batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                pin_memory=on_cuda(),
                                prefetch_factor=4 if args.workers else None)
            return epoch_result(*timed_epoch(loader, None))

        rows.append((f"data path alone: streaming JPEG DataLoader ({args.workers} workers)",
                     measured(loader_alone)))

        def epoch_with_evaluation() -> dict:
            free_memory()
            trainer = Trainer(amp=True, channels_last=True, compile_model=False)
            for images, labels in batches(True):  # cuDNN autotuning outside the timing
                trainer.step(images, labels)
                break
            evaluate(trainer, [next(iter(batches(False)))])
            sync()
            started = time.perf_counter()
            trained, _ = timed_epoch(batches(True), trainer.step)
            hits = evaluate(trainer, batches(False))
            sync()
            seconds = time.perf_counter() - started
            result = epoch_result(trained + len(test), seconds, peak=peak_gib())
            result["note"] = (f"train {trained} + evaluate {len(test)} images; "
                              f"finite loss: {trainer.all_finite()}; {hits} test hits")
            return result

        rows.append(("epoch + evaluation, decode-once path, bf16/CL (the engine's default)",
                     measured(epoch_with_evaluation)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def epoch_result(images: int, seconds: float, peak: float | None = None) -> dict:
    return {"images_per_s": images / seconds, "epoch_s": seconds, "peak_gib": peak,
            "images": images}


def measured(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as exc:  # one broken row must not cost the rest of a GPU session
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def render(rows: list[tuple[str, dict]], args: argparse.Namespace) -> str:
    if on_cuda():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        device = "the CPU (dry run: sizes are tiny, numbers mean nothing)"
    lines = [
        f"## ResNet50 on {device}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}; batch {args.batch} at {args.size}x{args.size}, "
        f"AdaMax (foreach), {STANFORD_CARS_CLASSES} classes. Synthetic rows: {args.steps} timed "
        f"steps after {args.warmup} warm-up steps. Data rows: {args.images} training and "
        f"{args.test_images} test JPEGs (~700x480, generated).",
        "",
        "| run | images/s | peak GiB | epoch s | notes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | failed | | | {r['error']} |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
        epoch = f"{r['epoch_s']:.2f}" if "epoch_s" in r else ""
        notes = r.get("note", "")
        if "warmup_s" in r:
            notes = f"warm-up {r['warmup_s']:.1f}s" + ("" if r["finite"] else ", NON-FINITE loss")
        lines.append(f"| {label} | {r['images_per_s']:,.0f} | {peak} | {epoch} | {notes} |")
    results = dict(rows)
    best = max((r["images_per_s"] for label, r in rows
                if label.startswith("ours:") and "images_per_s" in r), default=None)
    if best is not None:
        verdict = "met" if best >= TARGET_IMAGES_PER_SECOND else "NOT met"
        lines += ["", f"Goal ours bf16 + channels_last >= {TARGET_IMAGES_PER_SECOND:,} "
                  f"images/s: {verdict} (best {best:,.0f})."]
    epoch = next((r for label, r in results.items() if label.startswith("epoch +")), {})
    if "epoch_s" in epoch:
        verdict = "met" if epoch["epoch_s"] <= TARGET_EPOCH_SECONDS else "NOT met"
        lines += [f"Goal one epoch with evaluation <= {TARGET_EPOCH_SECONDS:.0f} s: {verdict} "
                  f"({epoch['epoch_s']:.2f} s)."]
    peaks = [r["peak_gib"] for r in results.values() if r.get("peak_gib") is not None]
    if peaks:
        lines += [f"Peak GPU memory: {max(peaks):.1f} GiB (the largest row; each row starts "
                  "from freed memory)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--images", type=int, default=STANFORD_CARS_TRAIN)
    parser.add_argument("--test-images", type=int, default=STANFORD_CARS_TEST)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-epochs", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or None)
    parser.add_argument("--doc", type=Path, default=None,
                        help="the benchmarks page to write the table into (default: "
                        "docs/benchmarks.md on CUDA, none in a dry run)")
    parser.add_argument("--dry-run", "--cpu-dry-run", dest="dry_run", action="store_true",
                        help="run every row on the CPU at toy sizes (checks the script)")
    args = parser.parse_args(argv)
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        torch.set_num_threads(1)  # a shared CPU: one thread is steadier than two that wait
        args.batch, args.size, args.steps, args.warmup = 4, 32, 1, 1
        args.images, args.test_images = min(args.images, 12), min(args.test_images, 8)
        args.workers = min(args.workers, 2)
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--dry-run checks the script)")
        return 2
    else:
        torch.backends.cudnn.benchmark = True  # as the engine does on CUDA
        if args.doc is None:
            args.doc = BENCHMARKS_PAGE

    modes = [(f"{who}: bf16 autocast + channels_last{', torch.compile' if compiled else ''}",
              who, compiled)
             for compiled in ([False] if args.skip_compile else [False, True])
             for who in ("ours", "torchvision")]
    rows = []
    for label, who, compiled in modes:
        result = measured(lambda w=who, c=compiled: synthetic_throughput(
            True, True, c, args.batch, args.size, args.steps, args.warmup, model=w))
        print(label, json.dumps(result), flush=True)
        rows.append((label, result))
    if not args.skip_epochs:
        for label, result in pipeline_rows(args):
            print(label, json.dumps(result), flush=True)
            rows.append((label, result))

    table = render(rows, args)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu-check.md").write_text(table + "\n")
        (out / "gpu-check.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    if args.doc is not None:
        write_section(args.doc, SECTION, table)
        print(f"wrote the {SECTION} section of {args.doc}")
    failed = [label for label, r in rows if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

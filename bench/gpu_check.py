"""Measurements for a lent GPU (run by ``scripts/gpu-check``): ResNet50 training speed and
memory on synthetic 224x224 batches, then a whole Stanford-Cars-sized epoch (8,144 images)
with the input pipeline included, JPEG decoding in DataLoader workers against a decoded
uint8 cache augmented on the GPU (``bench.gpu_pipeline``).

    python -m bench.gpu_check --out "$OUT"        # ~3-4 minutes on an H200

Prints one markdown table and writes it (and the raw numbers as JSON) under ``--out``.
Each row is measured on its own: one that fails says why and the others still run.
Needs torch, torchvision, numpy and pillow only (no pydantic), so it runs on a bare image.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from labctl.bench.gpu_pipeline import GpuImageCache, centre_square
from labctl.worker.resnet import resnet50

STANFORD_CARS_TRAIN = 8144
STANFORD_CARS_CLASSES = 196
#: The project's goal for bf16 + channels_last training on an H200.
TARGET_IMAGES_PER_SECOND = 6000
#: Distinct JPEGs generated; the 8,144 files cycle through them (decoding cost per file is
#: what matters, and encoding 8,144 would take longer than the epoch being measured).
DISTINCT_JPEGS = 256


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

    def __init__(self, amp: bool, channels_last: bool, compile_model: bool):
        torch.manual_seed(0)
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = resnet50(num_classes=STANFORD_CARS_CLASSES).to(
            DEVICE, memory_format=self.format).train()
        self.forward = torch.compile(self.model) if compile_model else self.model
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
                         size: int, steps: int, warmup: int) -> dict:
    free_memory()
    trainer = Trainer(amp, channels_last, compile_model)
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

def write_jpegs(folder: Path, count: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``count`` JPEG files sized like Stanford Cars photos (~700x470, quality 90)."""
    rng = np.random.default_rng(seed)

    def encode(i: int) -> bytes:
        local = np.random.default_rng(seed * 1000 + i)
        w = int(local.integers(560, 900))
        h = int(w * local.uniform(0.6, 0.75))
        # Smooth colour fields plus grain: compresses (and decodes) like a photo, unlike noise.
        coarse = local.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(img, np.int16) + local.integers(-12, 13, (h, w, 3), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        blobs = list(pool.map(encode, range(min(DISTINCT_JPEGS, count))))
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(blobs[i % len(blobs)])
        paths.append(str(path))
    labels = rng.integers(0, STANFORD_CARS_CLASSES, count).astype(np.int64)
    return paths, labels


def jpeg_dataset(paths: list[str], labels: np.ndarray, size: int) -> Dataset:
    """The engine's own pipeline for Stanford Cars: decode + RandomResizedCrop + flip +
    normalise per item, in the DataLoader workers."""
    from labctl.worker.data.samples import ImageSamples
    from labctl.worker.data.torch_datasets import ImageFileDataset
    from labctl.worker.data.transforms import train_transform

    return ImageFileDataset(ImageSamples(paths, labels), train_transform(size))


class SquareDataset(Dataset):
    """Decodes one JPEG to its (3, side, side) uint8 centre square (for the GPU cache)."""

    def __init__(self, paths: list[str], side: int):
        self.paths, self.side = paths, side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from labctl.worker.data.cache import decode_short_side

        square = centre_square(decode_short_side(self.paths[i], None, self.side), self.side)
        return torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1)


def build_gpu_cache(paths: list[str], labels: np.ndarray, side: int, size: int,
                    workers: int) -> GpuImageCache:
    images = torch.empty(len(paths), 3, side, side, dtype=torch.uint8, device=DEVICE)
    loader = DataLoader(SquareDataset(paths, side), batch_size=256, num_workers=workers,
                        pin_memory=on_cuda())
    offset = 0
    for chunk in loader:
        images[offset:offset + len(chunk)].copy_(chunk, non_blocking=True)
        offset += len(chunk)
    sync()
    return GpuImageCache(images, torch.from_numpy(labels), size)


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


def pipeline_rows(args: argparse.Namespace) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    folder = Path(tempfile.mkdtemp(prefix="labctl-cars-"))
    try:
        started = time.perf_counter()
        paths, labels = write_jpegs(folder, args.images)
        print(f"wrote {len(paths)} JPEGs in {time.perf_counter() - started:.1f}s", flush=True)
        workers = args.workers

        def loader() -> DataLoader:
            return DataLoader(jpeg_dataset(paths, labels, args.size), batch_size=args.batch,
                              shuffle=True, num_workers=workers, pin_memory=on_cuda(),
                              prefetch_factor=4 if workers else None)

        rows.append((f"JPEG DataLoader alone ({workers} workers), no training",
                     measured(lambda: epoch_result(*timed_epoch(loader(), None)))))

        def jpeg_epoch() -> dict:
            free_memory()
            trainer = Trainer(amp=True, channels_last=True, compile_model=False)
            images = torch.randn(args.batch, 3, args.size, args.size)
            for _ in range(3):  # warm cuDNN outside the timed epoch
                trainer.step(images, torch.zeros(args.batch, dtype=torch.int64))
            return epoch_result(*timed_epoch(loader(), trainer.step), peak=peak_gib())

        rows.append((f"epoch: JPEG decode in DataLoader ({workers} workers) + bf16/CL train",
                     measured(jpeg_epoch)))

        def gpu_cache_epoch() -> dict:
            free_memory()
            started = time.perf_counter()
            cache = build_gpu_cache(paths, labels, args.cache_side, args.size, workers)
            build_s = time.perf_counter() - started
            trainer = Trainer(amp=True, channels_last=True, compile_model=False)
            for images, batch_labels in cache.epoch(args.batch):  # warm cuDNN, first batches
                trainer.step(images, batch_labels)
                break
            result = epoch_result(*timed_epoch(cache.epoch(args.batch), trainer.step),
                                  peak=peak_gib())
            result["note"] = f"cache built once in {build_s:.1f}s"
            return result

        rows.append(("epoch: uint8 cache on GPU + GPU crop/flip/normalise + bf16/CL train",
                     measured(gpu_cache_epoch)))
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
        f"steps after {args.warmup} warm-up steps. Epoch rows: {args.images} images.",
        "",
        "| run | images/s | peak GiB | epoch s | notes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | failed | | | {r['error']} |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
        epoch = f"{r['epoch_s']:.1f}" if "epoch_s" in r else ""
        notes = r.get("note", "")
        if "warmup_s" in r:
            notes = f"warm-up {r['warmup_s']:.1f}s" + ("" if r["finite"] else ", NON-FINITE loss")
        lines.append(f"| {label} | {r['images_per_s']:,.0f} | {peak} | {epoch} | {notes} |")
    bf16 = dict(rows).get("bf16 autocast + channels_last", {})
    if "images_per_s" in bf16:
        verdict = "met" if bf16["images_per_s"] >= TARGET_IMAGES_PER_SECOND else "NOT met"
        lines += ["", f"Goal bf16 + channels_last >= {TARGET_IMAGES_PER_SECOND:,} images/s: "
                  f"{verdict} ({bf16['images_per_s']:,.0f})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--images", type=int, default=STANFORD_CARS_TRAIN)
    parser.add_argument("--cache-side", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-epochs", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or None)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every row on the CPU at toy sizes (checks the script)")
    args = parser.parse_args(argv)
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
        torch.set_num_threads(1)  # a shared CPU: one thread is steadier than two that wait
        args.batch, args.size, args.steps, args.warmup = 2, 32, 2, 1
        args.images, args.cache_side, args.workers = min(args.images, 24), 72, 2
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--cpu-dry-run checks the script)")
        return 2
    else:
        torch.backends.cudnn.benchmark = True  # as the engine does on CUDA

    small = max(2, args.batch // 4)  # the spec's default batch (64) beside the large one
    modes = [("fp32 (TF32 convolutions), NCHW", False, False, False, args.batch),
             ("bf16 autocast + channels_last", True, True, False, args.batch),
             (f"bf16 autocast + channels_last, batch {small}", True, True, False, small)]
    if not args.skip_compile:
        modes.append(("bf16 autocast + channels_last + torch.compile", True, True, True,
                      args.batch))
    rows = []
    for label, amp, channels_last, compile_model, batch in modes:
        result = measured(lambda a=amp, c=channels_last, m=compile_model, b=batch:
                          synthetic_throughput(a, c, m, b, args.size, args.steps, args.warmup))
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
    failed = [label for label, r in rows if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

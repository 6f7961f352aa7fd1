"""The data path alone on this CPU: can it keep a model fed?

On generated JPEGs sized like Stanford Cars photos (bench/photos.py, ~700x480), at the
flagship's 224 px and batch 64, in images per second:

- decode once: every JPEG decoded to shorter side 256 into the uint8 cache (a job pays this
  once, later jobs never);
- cached + batched augmentation on the job's device (here the CPU): RandomResizedCrop, flip
  and normalisation from the cache (worker/data/device_batches.py), the default data path;
- streaming: the DataLoader decoding JPEGs and running torchvision's transforms in as many
  worker processes as there are cores (``data_path: stream``);

beside our ResNet50's own training images/s at 224 px on the same CPU.

    python -m bench.data_path             # ~1-2 minutes on 2 cores; updates the docs
    python -m bench.data_path --images 64 --no-write

The table goes into the ``data-path`` section of docs/benchmarks.md; others are kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from labctl.bench.docs_page import BENCHMARKS_PAGE, write_section
from labctl.bench.photos import write_photos
from labctl.worker.data.cache import decode_images
from labctl.worker.data.device_batches import DeviceBatches, DeviceImages
from labctl.worker.data.samples import ImageSamples
from labctl.worker.data.torch_datasets import ImageFileDataset
from labctl.worker.data.transforms import resize_size, train_transform
from labctl.worker.resnet import resnet50

SECTION = "data-path"
NUM_CLASSES = 196


def decode_rate(samples: ImageSamples, short: int, cache_dir: Path) -> tuple[float, object]:
    started = time.perf_counter()
    decoded = decode_images(samples, short, cache_dir)
    return len(samples) / (time.perf_counter() - started), decoded


def cached_rate(decoded, labels, size: int, batch: int, epochs: int) -> float:
    images = DeviceImages.from_decoded(decoded, torch.device("cpu"))
    batches = DeviceBatches(images, labels, size, batch, train=True,
                            generator=torch.Generator().manual_seed(0))
    count, started = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _y in batches:
            count += len(x)
    return count / (time.perf_counter() - started)


def streaming_rate(samples: ImageSamples, size: int, batch: int, workers: int) -> float:
    loader = DataLoader(ImageFileDataset(samples, train_transform(size)), batch_size=batch,
                        shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    # A whole epoch, worker start-up included: a CPU job's loader starts its workers anew
    # every epoch (persistent workers are for CUDA jobs only).
    count, started = 0, time.perf_counter()
    for x, _y in loader:
        count += len(x)
    return count / (time.perf_counter() - started)


def model_rate(size: int, batch: int, steps: int) -> float:
    """Our ResNet50's training images/s (forward, backward, AdaMax), median step."""
    torch.manual_seed(0)
    model = resnet50(num_classes=NUM_CLASSES).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    seconds = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step allocates the optimizer state
            seconds.append(time.perf_counter() - started)
    return batch / statistics.median(seconds)


def measure(images: int, size: int, batch: int, model_batch: int, model_steps: int,
            workers: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="labctl-bench-photos-"))
    try:
        paths, labels = write_photos(folder / "jpeg", images, NUM_CLASSES)
        samples = ImageSamples(paths, labels)
        decode, decoded = decode_rate(samples, resize_size(size), folder / "cache")
        result = {"decode": decode}
        for name, rate in (("cached", lambda: cached_rate(decoded, labels, size, batch, 2)),
                           ("streaming", lambda: streaming_rate(samples, size, batch, workers)),
                           ("model", lambda: model_rate(size, model_batch, model_steps))):
            started = time.perf_counter()
            result[name] = rate()
            print(f"{name}: {result[name]:,.1f} images/s "
                  f"({time.perf_counter() - started:.1f}s)", flush=True)
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def render(r: dict[str, float], args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    lines = [
        "## Data path on the CPU: decode once + batched augmentation vs streaming JPEGs",
        "",
        f"`python -m labctl.bench.data_path`: {args.images} generated JPEGs of ~700x480 "
        f"(Stanford Cars' average size), {args.size} px crops, batch {args.batch}, "
        f"{cores} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} "
        "intra-op threads. Images per second of the input pipeline alone (no model), then "
        f"our ResNet50's training step at {args.size} px (batch {args.model_batch}). Load "
        f"average {load:.1f} at the end (other work on the machine slows every row alike).",
        "",
        "| path | images/s | notes |",
        "| --- | ---: | --- |",
        f"| decode once into the uint8 cache (shorter side {resize_size(args.size)}) | "
        f"{r['decode']:,.0f} | once per dataset and size; later jobs read the cache |",
        f"| cached + RandomResizedCrop/flip/normalise in batches (`data_path: auto`) | "
        f"{r['cached']:,.0f} | on the job's device; here the CPU |",
        f"| streaming DataLoader, {args.workers} worker{'s' if args.workers != 1 else ''} "
        "(`data_path: stream`) | "
        f"{r['streaming']:,.0f} | JPEG decode + torchvision transforms every epoch |",
        f"| ResNet50 training step (ours, forward + backward + AdaMax) | {r['model']:,.1f} | "
        "what the data path has to feed |",
        "",
        f"Cached vs streaming: {r['cached'] / r['streaming']:.1f}x. "
        + _verdict(r),
    ]
    return "\n".join(lines)


def _verdict(r: dict[str, float]) -> str:
    feeds = [name for name in ("cached", "streaming") if r[name] >= r["model"]]
    said = {2: "both paths outrun", 1: f"only the {feeds[0] if feeds else ''} path outruns",
            0: "neither path keeps up with"}[len(feeds)]
    return (f"On this CPU {said} the model ({r['model']:.1f} images/s); a GPU training at "
            "~6,000 images/s needs a data path that does that many per second (GPU table).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_PAGE)
    args = parser.parse_args(argv)
    result = measure(args.images, args.size, args.batch, args.model_batch, args.model_steps,
                     args.workers)
    table = render(result, args)
    print(table)
    if not args.no_write:
        write_section(args.doc, SECTION, table)
        print(f"wrote the {SECTION} section of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

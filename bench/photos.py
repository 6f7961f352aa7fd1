"""Generated JPEGs sized like Stanford Cars photos (~700x480 on average), for the data-path
benchmarks (bench.data_path, bench.gpu_check)."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

#: Distinct JPEGs encoded; more files cycle through them. Decoding cost per file is what the
#: benchmarks measure, and encoding 16,000 photos would take longer than what is measured.
DISTINCT_JPEGS = 256


def encode_photo(seed: int) -> bytes:
    """One JPEG (quality 90), 560-900 px wide, aspect 0.6-0.75: smooth colour fields plus
    grain, which compresses and decodes like a photo (noise alone would not)."""
    rng = np.random.default_rng(seed)
    w = int(rng.integers(560, 900))
    h = int(w * rng.uniform(0.6, 0.75))
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(img, np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_photos(folder: Path, count: int, num_classes: int, seed: int = 0,
                 distinct: int = DISTINCT_JPEGS) -> tuple[list[str], np.ndarray]:
    """``count`` JPEG files in ``folder``; returns their paths and random labels (N,) int64."""
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        blobs = list(pool.map(encode_photo, range(seed * 100_000,
                                                  seed * 100_000 + min(distinct, count))))
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(blobs[i % len(blobs)])
        paths.append(str(path))
    labels = np.random.default_rng(seed).integers(0, num_classes, count).astype(np.int64)
    return paths, labels

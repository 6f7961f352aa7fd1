"""Decode-once storage for JPEG datasets (Stanford Cars, imagefolder).

Each image is decoded, cropped to its box if asked, and resized so its shorter side is
``short`` (aspect kept, long side capped at ``MAX_ASPECT * short``). The pixels of one split
go into one flat uint8 array plus an (N, 3) index of (offset, height, width), saved as .npy
and memory-mapped on later runs, so epochs read pixels instead of decoding JPEGs.

Where the cache lives: ``$LABCTL_DATA_CACHE_DIR`` if set ("off" disables caching), else
``<dataset folder>/.labctl-cache`` when that is writable, else ``<artifacts root>/
.decode-cache`` (compose mounts the data read-only), else nothing is cached (the images
are decoded into memory for this process only). A cache file is keyed by the sha256 of
every path, file size and mtime, the boxes and ``short``; a changed file means a new key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from labctl.shared.artifacts import mkstemp_like_open
from labctl.worker.data.samples import ImageSamples, open_rgb

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: the long side rounds down, as torchvision's; 3: EXIF orientation
MAX_ASPECT = 3.0
ENV_CACHE_DIR = "LABCTL_DATA_CACHE_DIR"


def resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """Resize so the shorter side is ``short`` (bilinear, antialiased when shrinking). The
    long side is ``int(short * long / shorter)``, as torchvision's ``Resize(short)`` computes
    it, so cached pixels are the ones its test transform would produce."""
    w, h = img.size
    cap = int(short * MAX_ASPECT)
    if w <= h:
        size = (short, min(int(short * h / w), cap))
    else:
        size = (min(int(short * w / h), cap), short)
    return img if size == (w, h) else img.resize(size, Image.Resampling.BILINEAR)


def decode_short_side(path: str, box: np.ndarray | None, short: int) -> np.ndarray:
    """One image as (h, w, 3) uint8 with min(h, w) == short."""
    return np.asarray(resize_short_side(open_rgb(path, box, min_side=short), short))


class DecodedImages:
    """Variable-size uint8 images: ``images[i]`` is (h_i, w_i, 3). Picklable: a file-backed
    instance pickles as its two paths and re-opens the memory maps in the new process."""

    def __init__(self, data: np.ndarray | None = None, index: np.ndarray | None = None,
                 files: tuple[str, str] | None = None):
        self._data, self._index, self.files = data, index, files

    def _load(self) -> None:
        if self._data is None and self.files is not None:
            self._data = np.load(self.files[0], mmap_mode="r")
            self._index = np.load(self.files[1])

    def __len__(self) -> int:
        self._load()
        return len(self._index)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The flat uint8 pixels (memory-mapped when on disk) and the (N, 3) int64 index of
        (offset, height, width)."""
        self._load()
        return self._data, self._index

    def __getitem__(self, i: int) -> np.ndarray:
        self._load()
        offset, h, w = (int(v) for v in self._index[i])
        return np.asarray(self._data[offset: offset + h * w * 3]).reshape(h, w, 3)

    def __getstate__(self) -> dict:
        if self.files is None:
            return self.__dict__
        return {"_data": None, "_index": None, "files": self.files}


class ProgressLine:
    """``decoding 8144 images ...: 4100/8144 (50%), 812 images/s`` on stderr: rewritten in
    place on a terminal, otherwise one line per quarter (for at least ``QUARTERS_FROM``
    images; fewer get just the last) so worker logs stay short."""

    QUARTERS_FROM = 1000

    def __init__(self, what: str, total: int, stream=None):
        self.what, self.total, self.done = what, total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = self.last = time.monotonic()
        self.next_quarter = 1

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.tty and now - self.last >= 0.5:
            self._write("\r")
            self.last = now
        elif not self.tty and self.total >= self.QUARTERS_FROM \
                and self.done * 4 >= self.next_quarter * self.total and self.done < self.total:
            self._write("", "\n")
            self.next_quarter += 1

    def close(self) -> None:
        self._write("\r" if self.tty else "", "\n")

    def _write(self, start: str, end: str = "") -> None:
        seconds = max(time.monotonic() - self.started, 1e-9)
        percent = 100 * self.done // max(self.total, 1)
        self.stream.write(f"{start}{self.what}: {self.done}/{self.total} ({percent}%), "
                          f"{self.done / seconds:.0f} images/s{end}")
        self.stream.flush()


def cache_dir_for(dataset_folder: Path) -> Path | None:
    """Where to keep caches for a dataset, or None (see the module docstring)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    folder = dataset_folder / ".labctl-cache"
    try:
        folder.mkdir(exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return _artifacts_cache_dir()


def _artifacts_cache_dir() -> Path | None:
    """``<artifacts root>/.decode-cache``: the job can always write there (the dot keeps it
    out of the job listing, whose names are job ids)."""
    from labctl.shared.settings import SettingsError, get_settings

    try:
        folder = Path(get_settings().artifacts_dir) / ".decode-cache"
        folder.mkdir(parents=True, exist_ok=True)
    except (SettingsError, OSError):
        return None
    return folder if os.access(folder, os.W_OK) else None


def cache_key(samples: ImageSamples, short: int) -> str:
    files = []
    for p in samples.paths:
        st = os.stat(p)
        files.append((p, st.st_size, st.st_mtime_ns))
    boxes = None if samples.boxes is None else samples.boxes.tolist()
    blob = json.dumps({"v": CACHE_VERSION, "short": short, "aspect": MAX_ASPECT,
                       "files": files, "boxes": boxes})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _decode_all(samples: ImageSamples, short: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode every sample with a thread pool (PIL releases the GIL while decoding and
    resizing, so threads scale without pickling pixels between processes)."""
    boxes = samples.boxes if samples.boxes is not None else [None] * len(samples)
    threads = min(16, os.cpu_count() or 1)
    progress = ProgressLine(f"decoding {len(samples)} images at shorter side {short} "
                            f"({threads} threads)", len(samples))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        images = []
        for image in pool.map(decode_short_side, samples.paths, boxes, [short] * len(samples)):
            images.append(image)
            progress.advance()
    progress.close()
    index = np.zeros((len(images), 3), dtype=np.int64)
    if images:
        index[:, 1:] = [img.shape[:2] for img in images]
        index[1:, 0] = np.cumsum(index[:, 1] * index[:, 2] * 3)[:-1]  # offsets into data
    data = np.concatenate([img.reshape(-1) for img in images]) if images else np.zeros(
        0, np.uint8)
    return data, index


def cache_files(samples: ImageSamples, short: int, cache_dir: Path) -> tuple[str, str]:
    """The (data, index) .npy files that hold ``samples`` at ``short`` in ``cache_dir``."""
    stem = cache_dir / f"decoded-{short}-{cache_key(samples, short)}"
    return f"{stem}.data.npy", f"{stem}.index.npy"


def is_cached(samples: ImageSamples, short: int, cache_dir: Path | None) -> bool:
    return cache_dir is not None and all(
        Path(f).is_file() for f in cache_files(samples, short, cache_dir))


def decode_images(samples: ImageSamples, short: int, cache_dir: Path | None) -> DecodedImages:
    """All images of ``samples`` at shorter side ``short``, from the cache when present."""
    if cache_dir is None:
        return DecodedImages(*_decode_all(samples, short))
    files = cache_files(samples, short, cache_dir)
    if all(Path(f).is_file() for f in files):
        return DecodedImages(files=files)
    log.info("decoding %d images to %s (once)", len(samples), cache_dir)
    data, index = _decode_all(samples, short)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write to temporary names then rename, data first: a reader that sees the index
        # file always finds complete data, and two writers racing just write the same bytes.
        for final, array in zip(files, (data, index), strict=True):
            # A unique name: compose replicas sharing the cache volume are all PID 1.
            tmp = mkstemp_like_open(cache_dir, suffix=".tmp.npy")
            try:
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as exc:
        log.warning("cannot write the decode cache in %s (%s); continuing without it",
                    cache_dir, exc)
        return DecodedImages(data, index)
    return DecodedImages(files=files)

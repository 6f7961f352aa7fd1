"""Lists of image files with labels (and optional boxes), and how to open one image."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from labctl.worker.data.subset import subset_indices
from labctl.worker.engine import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageSamples:
    """One split as files on disk.

    paths: N absolute file paths (str, so the object pickles small and fast).
    labels: (N,) int64, 0-based.
    boxes: (N, 4) int64 x1, y1, x2, y2 (1-based, inclusive, as in the Stanford devkit) or None.
    """

    paths: list[str]
    labels: np.ndarray
    boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, limit: int | None, seed: int, stream: int) -> ImageSamples:
        idx = subset_indices(len(self), limit, seed, stream)
        if len(idx) == len(self):
            return self
        return self.take(idx)

    def take(self, idx: np.ndarray) -> ImageSamples:
        """The samples at ``idx`` (int indices), in that order."""
        return ImageSamples([self.paths[i] for i in idx], self.labels[idx],
                            None if self.boxes is None else self.boxes[idx])


@dataclass
class ImageSource:
    """Both splits of a file dataset, plus the class names (index = label)."""

    train: ImageSamples
    test: ImageSamples
    class_names: list[str]
    root: Path  # the folder the layout was found in (for messages and the decode cache)


#: The EXIF Orientation tag, and the transpose that makes each of its values upright (what
#: ``PIL.ImageOps.exif_transpose`` does, here applied after a crop in stored coordinates).
EXIF_ORIENTATION = 0x0112
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def crop_box(size: tuple[int, int], box: np.ndarray) -> tuple[int, int, int, int]:
    """PIL crop rectangle (left, upper, right, lower) for a 1-based inclusive box, clamped
    to the image so a box that overhangs by a pixel (it happens in the devkit) still works."""
    w, h = size
    x1, y1, x2, y2 = (int(v) for v in box)
    left, upper = min(max(x1 - 1, 0), w - 1), min(max(y1 - 1, 0), h - 1)
    right, lower = max(min(x2, w), left + 1), max(min(y2, h), upper + 1)
    return left, upper, right, lower


def open_rgb(path: str, box: np.ndarray | None = None, min_side: int | None = None) -> Image.Image:
    """Open an image as RGB, cropped to ``box`` if given.

    ``min_side``: the caller will shrink the (cropped) image so its shorter side is this
    long; JPEGs are then decoded at a reduced DCT scale ("draft"), several times faster,
    never below that size.
    """
    return open_image(path, "RGB", box, min_side)


def open_image(path: str, mode: str, box: np.ndarray | None = None,
               min_side: int | None = None) -> Image.Image:
    """:func:`open_rgb` for any Pillow ``mode`` ("L" for the grey datasets)."""
    try:
        img = Image.open(path)
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        if min_side and img.format == "JPEG":
            w, h = img.size
            region = (box[2] - box[0] + 1, box[3] - box[1] + 1) if box is not None else (w, h)
            factor = min(region) / min_side
            if factor >= 2:
                img.draft(mode, (math.ceil(w / factor), math.ceil(h / factor)))
                if box is not None and img.size != (w, h):
                    sx, sy = img.size[0] / w, img.size[1] / h
                    box = np.array([(box[0] - 1) * sx + 1, (box[1] - 1) * sy + 1,
                                    box[2] * sx, box[3] * sy]).round()
        img.load()  # decode now, inside the try, so a corrupt file is reported by name
        if img.mode != mode:  # convert() copies even images in that mode: skip it then
            img = img.convert(mode)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        p = Path(path)
        # Pillow's own words repeat the whole path: "cannot identify image file '/a/b.jpg'".
        why = ("not an image format Pillow reads" if isinstance(exc, UnidentifiedImageError)
               else exc)
        raise DataError(f"cannot decode image {p.name} at {p.parent}: {why}") from None
    if box is not None:
        img = img.crop(crop_box(img.size, box))
    # After the crop: a bounding box is in the stored pixels' coordinates. A phone photo
    # stored sideways with its orientation in EXIF is then upright, as viewers show it.
    if orientation in ORIENTATION_TRANSPOSE:
        img = img.transpose(ORIENTATION_TRANSPOSE[orientation])
    return img


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

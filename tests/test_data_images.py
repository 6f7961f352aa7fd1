"""Image opening, box cropping, reduced-scale JPEG decoding and the decode cache format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from datasets_factory import write_jpeg
from PIL import Image, ImageOps

from labctl.worker.data.cache import DecodedImages, decode_images, resize_short_side
from labctl.worker.data.samples import ImageSamples, crop_box, open_rgb
from labctl.worker.engine import DataError

RED, GREY = (220, 30, 30), (128, 128, 128)


def test_crop_box_is_one_based_inclusive_and_clamped():
    assert crop_box((100, 50), np.array([1, 1, 100, 50])) == (0, 0, 100, 50)
    assert crop_box((100, 50), np.array([11, 6, 30, 25])) == (10, 5, 30, 25)
    assert crop_box((100, 50), np.array([0, -3, 120, 60])) == (0, 0, 100, 50)


@pytest.mark.parametrize("min_side", [None, 40])
def test_open_rgb_crops_the_box_with_and_without_draft(tmp_path, min_side):
    # 800x600 with a 400x300 red box: with min_side=40 the JPEG decodes at 1/8 scale.
    path = write_jpeg(tmp_path / "car.jpg", (800, 600), GREY, (201, 151, 600, 450), RED)
    img = open_rgb(str(path), np.array([201, 151, 600, 450]), min_side=min_side)
    assert img.mode == "RGB"
    if min_side is None:
        assert img.size == (400, 300)
    else:
        assert min(img.size) >= min_side and img.size[0] < 400  # reduced, never below min
    pixels = np.asarray(img, dtype=float)
    inner = pixels[2:-2, 2:-2]
    assert np.abs(inner - RED).max() < 40


def test_open_rgb_converts_grey_and_names_bad_files(tmp_path):
    Image.new("L", (10, 10), 50).save(tmp_path / "g.png")
    assert open_rgb(str(tmp_path / "g.png")).mode == "RGB"
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match=f"cannot decode image bad.jpg at {tmp_path}"):
        open_rgb(str(tmp_path / "bad.jpg"))


def test_resize_short_side_keeps_aspect_and_caps_it():
    assert resize_short_side(Image.new("RGB", (300, 200)), 50).size == (75, 50)
    assert resize_short_side(Image.new("RGB", (1000, 100)), 20).size == (60, 20)  # cap 3:1


def test_decoded_images_round_trip_and_pickle(tmp_path):
    paths = [str(write_jpeg(tmp_path / f"{i}.jpg", (60 + 20 * i, 40), RED)) for i in range(3)]
    samples = ImageSamples(paths, np.arange(3, dtype=np.int64))
    in_memory = decode_images(samples, 20, cache_dir=None)
    on_disk = decode_images(samples, 20, cache_dir=tmp_path / "cache")
    assert on_disk.files is not None and len(on_disk) == 3
    for i, width in enumerate((30, 40, 50)):
        assert in_memory[i].shape == on_disk[i].shape == (20, width, 3)
        np.testing.assert_array_equal(in_memory[i], on_disk[i])
    clone = pickle.loads(pickle.dumps(on_disk))
    assert isinstance(clone, DecodedImages) and len(pickle.dumps(on_disk)) < 1000
    np.testing.assert_array_equal(clone[2], on_disk[2])
    # A changed file gets a new cache entry instead of stale pixels.
    write_jpeg(tmp_path / "0.jpg", (60, 40), GREY)
    again = decode_images(samples, 20, cache_dir=tmp_path / "cache")
    assert again.files != on_disk.files and abs(int(again[0][5, 5, 1]) - GREY[1]) < 10


def sideways_photo(path: Path, orientation: int) -> Image.Image:
    """A 40x24 JPEG with a distinct quadrant pattern, stored with EXIF ``orientation``.
    Returns what a viewer shows (Pillow's own ``exif_transpose`` of the file)."""
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:12, :20] = (255, 0, 0)
    pixels[:12, 20:] = (0, 255, 0)
    pixels[12:, :20] = (0, 0, 255)
    pixels[12:, 30:] = (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=100, exif=exif.tobytes())
    with Image.open(path) as stored:
        return ImageOps.exif_transpose(stored).convert("RGB")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_photo_is_decoded_upright_whatever_its_exif_orientation(tmp_path, orientation):
    upright = sideways_photo(tmp_path / "photo.jpg", orientation)
    decoded = open_rgb(str(tmp_path / "photo.jpg"))
    assert decoded.size == upright.size
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))


def test_a_bounding_box_is_in_the_stored_pixels_and_its_crop_shown_upright(tmp_path):
    # Orientation 3 (stored upside down): the stored box x 5..14, y 3..10 (1-based,
    # inclusive) is, as shown, x 27..36, y 15..22 of the 40x24 picture.
    upright = sideways_photo(tmp_path / "photo.jpg", 3)
    decoded = open_rgb(str(tmp_path / "photo.jpg"), box=np.array([5, 3, 14, 10]))
    expected = upright.crop((40 - 14, 24 - 10, 40 - 5 + 1, 24 - 3 + 1))
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))

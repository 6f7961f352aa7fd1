"""The batched augmentation of the decode-once path against torchvision: the crop sampler's
distributions (KS tests over many draws), the evaluation transform pixel for pixel, and the
gather-based resize against a plain bilinear resize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms as T

from labctl.worker.data.cache import decode_images
from labctl.worker.data.crops import CROP_RATIO, CROP_SCALE, centre_crops, random_resized_crops
from labctl.worker.data.device_batches import DeviceBatches, DeviceImages, Normaliser, resized_crops
from labctl.worker.data.samples import ImageSamples, open_rgb
from labctl.worker.data.transforms import resize_size
from labctl.worker.data.transforms import test_transform as eval_transform

DRAWS = 8_000
#: A KS p-value below this fails; with the same distribution the test fails once in 1,000.
P_MIN = 1e-3


def photo(path, width, height, seed):
    """A JPEG that decodes like a photo: smooth colour fields plus grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(img, np.int16) + rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=92)
    return str(path)


def torchvision_crops(height, width, draws):
    image = torch.zeros(1, height, width)
    return np.array([T.RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO))
                     for _ in range(draws)])


@pytest.mark.parametrize(("height", "width"), [(256, 373), (36, 150)])
def test_crop_sampler_draws_torchvisions_distributions(height, width):
    # (36, 150): aspect 4.2, where many draws do not fit and the fallback matters.
    torch.manual_seed(0)
    theirs = torchvision_crops(height, width, DRAWS)
    generator = torch.Generator().manual_seed(1)
    ours = random_resized_crops(torch.full((DRAWS,), height), torch.full((DRAWS,), width),
                                generator).numpy()
    assert ((ours[:, 2] >= 1) & (ours[:, 0] + ours[:, 2] <= height)).all()
    assert ((ours[:, 3] >= 1) & (ours[:, 1] + ours[:, 3] <= width)).all()
    for name, of in (("scale", lambda c: c[:, 2] * c[:, 3] / (height * width)),
                     ("log aspect", lambda c: np.log(c[:, 3] / c[:, 2])),
                     ("top", lambda c: c[:, 0]), ("left", lambda c: c[:, 1])):
        p = ks_2samp(of(ours), of(theirs)).pvalue
        assert p > P_MIN, f"{name}: KS p = {p:.2g}"


def test_a_different_distribution_fails_the_ks_check():
    # The check has teeth: the bench prototype's sampler, which clamps a crop that does not
    # fit instead of drawing again, is caught on a wide image at these draws.
    height, width = 36, 150
    theirs = torchvision_crops(height, width, DRAWS)
    rng = np.random.default_rng(0)
    area = height * width * rng.uniform(*CROP_SCALE, DRAWS)
    aspect = np.exp(rng.uniform(*np.log(CROP_RATIO), DRAWS))
    w = np.minimum(np.round(np.sqrt(area * aspect)), width)
    h = np.minimum(np.round(np.sqrt(area / aspect)), height)
    clamped_scale = w * h / (height * width)
    their_scale = theirs[:, 2] * theirs[:, 3] / (height * width)
    assert ks_2samp(clamped_scale, their_scale).pvalue < P_MIN


def test_centre_crops_are_torchvisions_offsets():
    for h, w in [(256, 373), (257, 256), (256, 259), (300, 300)]:
        top, left, ch, cw = centre_crops(torch.tensor([h]), torch.tensor([w]), 224)[0].tolist()
        image = torch.arange(h * w).view(1, h, w)
        expected = T.CenterCrop(224)(image)
        assert torch.equal(image[:, top:top + ch, left:left + cw], expected)


#: One 8-bit level in normalised units (the largest std, blue's, gives the smallest step).
LEVEL = 1 / (255 * 0.225)


@pytest.mark.parametrize("image_size", [32, 224])
def test_evaluation_matches_torchvision_resize_and_centre_crop(tmp_path, image_size):
    sizes = [(700, 480), (480, 700), (333, 250), (1000, 520)]
    paths = [photo(tmp_path / f"{i}.jpg", w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    samples = ImageSamples(paths, np.arange(len(paths)))
    short = resize_size(image_size)
    decoded = decode_images(samples, short, tmp_path / "cache")
    batches = DeviceBatches(DeviceImages.from_decoded(decoded, torch.device("cpu")),
                            samples.labels, image_size, batch_size=3, train=False)
    ours = torch.cat([images for images, _ in batches])
    assert ours.shape == (len(paths), 3, image_size, image_size)
    # The streaming path's test split: the same reduced-scale JPEG decode, then
    # torchvision's Resize + CenterCrop. The same pixels, to float rounding.
    streamed = torch.stack([eval_transform(image_size)(open_rgb(p, min_side=short))
                            for p in paths])
    torch.testing.assert_close(ours, streamed, rtol=0, atol=1e-4)
    if image_size == 224:
        # Against a full-resolution decode (JPEG "draft" scaling is the only difference):
        # within 5 levels per pixel, half a level on average. At 32 px the draft decodes at
        # 1/8 scale and the gap is larger (up to ~17 levels), for both data paths alike.
        full = torch.stack([eval_transform(image_size)(open_rgb(p)) for p in paths])
        difference = (ours - full).abs()
        assert difference.max() <= 5 * LEVEL and difference.mean() <= 0.5 * LEVEL


def test_resized_crop_is_a_bilinear_resize_of_the_crop_with_flips():
    # Against F.interpolate (bilinear, align_corners=False, no antialias) of each crop.
    generator = torch.Generator().manual_seed(0)
    shapes = [(40, 60), (50, 50), (30, 90)]
    arrays = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator)
              for h, w in shapes]
    offsets = np.cumsum([0] + [h * w for h, w in shapes[:-1]])
    images = DeviceImages(torch.cat([a.reshape(-1, 3) for a in arrays]),
                          torch.as_tensor(offsets), torch.tensor([h for h, _ in shapes]),
                          torch.tensor([w for _, w in shapes]))
    boxes = torch.tensor([[3, 5, 30, 41], [0, 0, 50, 50], [10, 20, 12, 20]])
    flips = torch.tensor([False, True, True])
    out = resized_crops(images, torch.arange(3), boxes, flips, 16, Normaliser(torch.device("cpu")))
    assert out.shape == (3, 3, 16, 16) and out.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = arrays[i][top:top + h, left:left + w].permute(2, 0, 1).float()[None]
        expected = F.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False)[0]
        if flips[i]:
            expected = expected.flip(-1)
        expected = (expected / 255 - mean) / std
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-4)


def test_training_batches_are_seeded_by_the_generator_alone():
    pixels = torch.randint(0, 256, (5 * 40 * 60, 3), dtype=torch.uint8)
    images = DeviceImages(pixels, torch.arange(5) * 2400, torch.full((5,), 40),
                          torch.full((5,), 60))

    def epoch(seed):
        batches = DeviceBatches(images, np.arange(5), 24, 2, train=True,
                                generator=torch.Generator().manual_seed(seed))
        return [(x.clone(), y.clone()) for x, y in batches]

    first, again, other = epoch(3), epoch(3), epoch(4)
    assert len(first) == 3 and [len(y) for _, y in first] == [2, 2, 1]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(5))
    assert math.isfinite(float(first[0][0].sum()))

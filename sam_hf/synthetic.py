"""Synthetic images of blobs with instance maps: the pretraining data of the tiny offline base model, and test data."""

from __future__ import annotations

import datasets
import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["synthetic_blobs", "synthetic_dataset"]


def synthetic_blobs(
    rng: np.random.Generator,
    height: int = 256,
    width: int = 256,
    num_objects: tuple[int, int] = (3, 20),
    radius: tuple[float, float] = (4.0, 32.0),
    shape: str = "blob",
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image `(H, W, 3)` of irregular blobs on a smooth noisy background, and its instance map.

    Blobs are ellipses with a wobbly outline (`shape="blob"`) or axis-aligned rectangles (`shape="box"`, whose mask
    fills its box), bright on dark or dark on light, with their own shading. Later blobs cover earlier ones; ids are
    renumbered 1..N over the visible objects.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    instances = np.zeros((height, width), np.int32)
    dark_background = rng.random() < 0.6
    background = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), sigma=rng.uniform(8, 32))
    background = (background - background.min()) / (np.ptp(background) + 1e-6)
    base = rng.uniform(0.02, 0.25) if dark_background else rng.uniform(0.7, 0.95)
    intensity = base + rng.uniform(0.0, 0.15) * background
    for i in range(1, int(rng.integers(num_objects[0], num_objects[1] + 1)) + 1):
        r = float(np.exp(rng.uniform(np.log(radius[0]), np.log(radius[1]))))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        a, b = r * rng.uniform(0.6, 1.4), r * rng.uniform(0.6, 1.4)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        angle = np.arctan2(v, u)
        wobble = 1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6.28)) * rng.uniform(0, 1)
        inside = np.hypot(u, v) < wobble if shape == "blob" else (np.abs(dx) < a) & (np.abs(dy) < b)
        instances[inside] = i
        contrast = rng.uniform(0.25, 0.7) * (1 if dark_background else -1)
        shade = 1 - 0.3 * rng.random() * np.clip(np.hypot(u, v), 0, 1)
        intensity = np.where(inside, base + contrast * shade, intensity)
    intensity = intensity + rng.normal(0, rng.uniform(0.01, 0.06), intensity.shape)
    tint = rng.uniform(0.6, 1.0, 3) if rng.random() < 0.4 else np.ones(3)
    rgb = np.clip(intensity[..., None] * tint * 255, 0, 255).astype(np.uint8)
    visible = np.unique(instances)
    visible = visible[visible > 0]
    remap = np.zeros(instances.max() + 1, np.int32)
    remap[visible] = np.arange(1, len(visible) + 1)
    return rgb, remap[instances]


def synthetic_dataset(
    num_images: int, seed: int = 0, size_range: tuple[int, int] = (192, 320), shape: str = "blob"
) -> datasets.Dataset:
    """A `Dataset` with `image` and `label` (16-bit instance map) columns of `synthetic_blobs` of random sizes."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(num_images):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        rgb, inst = synthetic_blobs(rng, h, w, shape=shape)
        images.append(Image.fromarray(rgb))
        labels.append(Image.fromarray(inst.astype(np.uint16)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

"""Synthetic images of blobs with instance maps: the pretraining data of the tiny offline base model, and test data."""

from __future__ import annotations

import datasets
import numpy as np
from PIL import Image
from scipy import ndimage


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
    return _finish(rng, intensity, instances, min_tint=0.6)


def _finish(
    rng: np.random.Generator, intensity: np.ndarray, instances: np.ndarray, min_tint: float
) -> tuple[np.ndarray, np.ndarray]:
    """The RGB image (a random colour tint on 40% of images) and the instance map renumbered 1..n over the objects
    that stayed visible (later objects may cover earlier ones)."""
    tint = rng.uniform(min_tint, 1.0, 3) if rng.random() < 0.4 else np.ones(3)
    rgb = np.clip(intensity[..., None] * tint * 255, 0, 255).astype(np.uint8)
    visible = np.unique(instances)
    visible = visible[visible > 0]
    remap = np.zeros(instances.max() + 1, np.int32)
    remap[visible] = np.arange(1, len(visible) + 1)
    return rgb, remap[instances]


def synthetic_cells(
    rng: np.random.Generator,
    height: int = 256,
    width: int = 256,
    radius: tuple[float, float] = (2.5, 24.0),
    coverage: tuple[float, float] = (0.03, 0.55),
    max_objects: int = 300,
    contrast: tuple[float, float] = (0.25, 0.75),
    falloff: float = 0.4,
    blur: tuple[float, float] = (0.3, 1.5),
    noise: tuple[float, float] = (0.005, 0.05),
    dark_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image `(H, W, 3)` of many touching, textured ellipses, and its instance map.

    Each image draws a typical object radius (log-uniform in `radius`, pixels) and a fraction of the image to cover
    (`coverage`), then places wobbly ellipses of about that size at random, some in clusters, allowed to touch and
    overlap a little (later ones cover earlier ones). Objects vary in brightness and carry their own smooth texture
    and shading; the image is then blurred a little, so edges are soft, and noised. Half the images are bright objects
    on a dark background, the rest dark on light, some tinted. Ids are renumbered 1..N over the visible objects.

    The appearance ranges: each image's mean object contrast is uniform in `contrast` (each object then 0.4x to 1.3x
    of it), an object's brightness falls towards its outline by up to `falloff` of its contrast, the blur sigma is
    uniform in `blur` pixels and the noise sigma uniform in `noise`; `dark_fraction` of the images have a dark
    background. `NUCLEI_APPEARANCE` widens them towards fluorescence microscopy (dim objects, soft outlines).
    """
    instances = np.zeros((height, width), np.int32)
    dark_background = rng.random() < dark_fraction
    background = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), sigma=rng.uniform(8, 48))
    background = (background - background.min()) / (np.ptp(background) + 1e-6)
    base = rng.uniform(0.0, 0.2) if dark_background else rng.uniform(0.65, 0.95)
    intensity = base + rng.uniform(0.0, 0.2) * (background - 0.5)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), sigma=rng.uniform(0.7, 2.5))
    texture = texture / (texture.std() + 1e-6)
    r0 = float(np.exp(rng.uniform(np.log(radius[0]), np.log(radius[1]))))
    n = int(np.clip(rng.uniform(*coverage) * height * width / (np.pi * r0**2), 1, max_objects))
    clusters = rng.uniform((0, 0), (height, width), size=(int(rng.integers(1, 6)), 2))
    clustered = rng.random() * 0.7
    mean_contrast = rng.uniform(*contrast)
    spacing = rng.uniform(0.65, 1.0)
    placed: list[tuple[float, float, float]] = []
    for i in range(1, n + 1):
        r = r0 * float(np.exp(rng.normal(0, 0.25)))
        for _ in range(20):
            if rng.random() < clustered:
                cy, cx = clusters[rng.integers(len(clusters))] + rng.normal(0, 4 * r0, 2)
            else:
                cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            if all(np.hypot(cy - y, cx - x) > spacing * (r + s) for y, x, s in placed):
                break
        else:
            continue
        placed.append((cy, cx, r))
        a, b = r * rng.uniform(0.75, 1.3), r * rng.uniform(0.7, 1.0)
        theta = rng.uniform(0, np.pi)
        reach = 1.6 * max(a, b) + 2
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, height)
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = dy - cy, dx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        angle = np.arctan2(v, u)
        wobble = 1 + sum(rng.uniform(0, 0.08) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
        rho = np.hypot(u, v) / wobble
        inside = rho < 1
        window = (slice(y0, y1), slice(x0, x1))
        instances[window][inside] = i
        object_contrast = mean_contrast * rng.uniform(0.4, 1.3) * (1 if dark_background else -1)
        shade = 1 - rng.uniform(0, falloff) * np.clip(rho, 0, 1) ** 2
        grain = 1 + rng.uniform(0, 0.35) * texture[window]
        intensity[window] = np.where(inside, base + object_contrast * shade * grain, intensity[window])
    intensity = ndimage.gaussian_filter(intensity, sigma=rng.uniform(*blur))
    intensity = intensity + rng.normal(0, rng.uniform(*noise), intensity.shape)
    return _finish(rng, intensity, instances, min_tint=0.5)


# What real fluorescence nuclei look like, measured on the 24 training images of data/nuclei_demo (694 nuclei of at
# least 60 px): the core's contrast over the background (0-1 grey levels) is 0.14 / 0.19 / 0.28 at the quartiles,
# and the outline has 0.6x the core's contrast (median; 0.3x at the 10th percentile). Objects drawn with the default
# ranges measure 0.24 / 0.35 / 0.50, with these 0.09 / 0.19 / 0.31 (tests/test_synthetic.py). Only these summary
# numbers come from real images; no real image is drawn from or trained on.
NUCLEI_APPEARANCE = {
    "contrast": (0.06, 0.6),
    "falloff": 0.75,
    "blur": (0.5, 2.0),
    "noise": (0.002, 0.02),
    "dark_fraction": 0.8,
}


def synthetic_dataset(
    num_images: int, seed: int = 0, size_range: tuple[int, int] = (192, 320), shape: str = "blob"
) -> datasets.Dataset:
    """A `Dataset` with `image` and `label` (16-bit instance map) columns of random sizes: `synthetic_blobs` (`shape`
    `"blob"` or `"box"`), `synthetic_cells` (`"cells"`), or `synthetic_cells` with `NUCLEI_APPEARANCE` (`"nuclei"`)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(num_images):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        if shape == "cells":
            rgb, inst = synthetic_cells(rng, h, w)
        elif shape == "nuclei":
            rgb, inst = synthetic_cells(rng, h, w, **NUCLEI_APPEARANCE)
        else:
            rgb, inst = synthetic_blobs(rng, h, w, shape=shape)
        images.append(Image.fromarray(rgb))
        labels.append(Image.fromarray(inst.astype(np.uint16)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

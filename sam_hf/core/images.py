"""Images: reading files safely, listing folders, conversion to RGB arrays and the processors' input frame."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.image_utils import ChannelDimension

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def _list_images(folder: Path) -> dict[str, Path]:
    """Image files of `folder` by stem; two files with one stem (`a.png` and `a.jpg`) are refused, not one dropped."""
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(p.stem, []).append(p)
    clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if clashes:
        listed = "; ".join(", ".join(p.name for p in paths) for paths in clashes.values())
        raise ValueError(
            f"{folder} has {len(clashes)} file stem(s) shared by several image files ({listed}); images, masks and "
            "instances are paired by stem, so each stem must name exactly one file. Remove or rename the extra files."
        )
    return {stem: paths[0] for stem, paths in by_stem.items()}


def _bomb_message(path: Path | str, err: Exception) -> str:
    what = path if isinstance(path, str) else f"Image file {path}"
    return (
        f"{what} is larger than Pillow's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS:,} pixels ({err}). If the image is intended, raise the limit before loading the "
        "data, e.g. `PIL.Image.MAX_IMAGE_PIXELS = 400_000_000` (or None to disable the check) in your launcher; "
        "otherwise remove or downscale the file."
    )


def _check_readable(path: Path) -> tuple[tuple[int, int], str | None]:
    """`((width, height), format)` of an image file, or a `ValueError` naming the file."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                size, fmt = im.size, im.format
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                logger.warning("%s", _bomb_message(path, w.message).replace("If the image", "Pillow accepts it, but"))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return size, fmt
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(_bomb_message(path, err)) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"Cannot read image file {path}: {err}. Expected a readable image file.") from err


def to_rgb_array(image: Any) -> np.ndarray:
    """Convert a PIL image or array (grayscale, RGBA, 16-bit, float) to an `(H, W, 3)` uint8 array."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = np.asarray(image)
        else:
            # A writable copy: a view of PIL's buffer is read-only, and processors wrap it with torch.from_numpy.
            return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo) * 255 + 0.5).astype(np.uint8) if hi > lo else np.zeros(arr.shape, np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"Expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}.")
    return np.ascontiguousarray(arr)


def encode_images(image_processor: Any, images: Any, **kwargs: Any) -> Any:
    """Run a SAM image processor on `(H, W, 3)` arrays (one, or a list), telling it the channels come last.

    Without `input_data_format`, transformers guesses the channel axis from the shape and reads an image 1, 3 or 4
    pixels high as channels-first: a 4x64 image becomes "64x3". Every (H, W, 3) array that meets an image processor
    in sam_hf goes through here.

    Returns:
        The processor's `BatchFeature` (`pixel_values`, `original_sizes`, `reshaped_input_sizes`) as torch tensors.
        Processors that resize to the square input without padding (SAM 2) report no `reshaped_input_sizes`; it is
        then the input's own size.
    """
    enc = image_processor(images=images, input_data_format=ChannelDimension.LAST, return_tensors="pt", **kwargs)
    if "reshaped_input_sizes" not in enc:
        n, side = enc["pixel_values"].shape[0], enc["pixel_values"].shape[-2:]
        enc["reshaped_input_sizes"] = torch.tensor([list(side)] * n)
    return enc


def _open_entry(entry: Any, what: str, load: bool = True) -> Any:
    """A PIL image from a `datasets.Image(decode=False)` value, with the decompression-bomb check naming `what`;
    anything else (decoded images, arrays) is returned as it is."""
    if not (isinstance(entry, dict) and ("bytes" in entry or "path" in entry)):
        return entry
    source = io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(source)  # reads the header, where Pillow checks the size
            if load:
                image.load()
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                logger.warning("%s", _bomb_message(what, w.message).replace("If the image", "Pillow accepts it, but"))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(_bomb_message(what, err)) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{what} cannot be decoded: {err}. Expected a readable image.") from err


def resized_shape(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The `(H, W)` that `SamImageProcessor` resizes an image to: longest side `longest_edge`, aspect kept."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def scale_coords(coords: Any, original_size: tuple[int, int], reshaped_size: tuple[int, int]) -> torch.Tensor:
    """Map pixel coordinates from the original image to the resized input frame, as `SamProcessor` does.

    `coords` ends in xy pairs: `(..., 2)` points or `(..., 4)` xyxy boxes.
    """
    (old_h, old_w), (new_h, new_w) = original_size, reshaped_size
    coords = np.asarray(coords, np.float64)
    if coords.ndim == 0 or coords.shape[-1] not in (2, 4):
        raise ValueError(f"Expected coordinates of shape (..., 2) or (..., 4), got {coords.shape}.")
    factors = np.tile([new_w / old_w, new_h / old_h], coords.shape[-1] // 2)
    return torch.from_numpy(coords * factors).float()

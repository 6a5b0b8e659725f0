"""Masks: instance maps from any mask, boxes from instances or masks, and painting masks into an instance map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torchvision.ops import masks_to_boxes

MASK_TYPES = ("auto", "instance", "binary", "semantic")


#: Pillow formats that store pixels lossily; a mask in one of them has values that were never labels.
LOSSY_MASK_FORMATS = ("JPEG", "MPO")


_LOSSY_MASK_MESSAGE = (
    "masks must be stored losslessly (PNG/TIFF), JPEG compression creates false objects (it blurs every edge into "
    "values between the labels). Re-export the masks as PNG or TIFF from their original source"
)


def check_lossless_mask(mask: Any, where: str = "mask") -> None:
    """Raise a `ValueError` if `mask` is a PIL image decoded from a lossy format (JPEG).

    JPEG changes pixel values near every edge, so an instance or binary mask read back from a JPEG file has dozens
    of spurious values, each of which would become a false object. Arrays and losslessly decoded images pass.

    Args:
        mask: the mask as given to `mask_to_instances` (a PIL image, or an array, which is not checked).
        where (`str`, *optional*): what to call the mask in the message (a file name or a dataset row).
    """
    fmt = getattr(mask, "format", None) if isinstance(mask, Image.Image) else None
    if fmt in LOSSY_MASK_FORMATS:
        name = getattr(mask, "filename", "") or ""
        source = f" (file {name})" if name and name not in where else ""
        raise ValueError(f"{where}{source} is a {fmt} image: {_LOSSY_MASK_MESSAGE}.")


def _mask_array(mask: Any) -> np.ndarray:
    check_lossless_mask(mask)
    arr = np.asarray(mask)
    if arr.ndim == 3:
        if not (arr[..., :1] == arr).all():
            raise ValueError(f"Expected a single-channel mask, got shape {arr.shape} with differing channels.")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"Expected a 2-D mask, got shape {arr.shape}.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(
            f"The mask has {int((~np.isfinite(arr)).sum())} NaN or infinite value(s); expected finite labels "
            "(0 = background)."
        )
    return arr


def mask_to_instances(mask: Any, mask_type: str = "auto") -> np.ndarray:
    """Turn a mask into an instance map: `(H, W)` int32 with ids 1..N for the N objects and 0 for background.

    Args:
        mask: an `(H, W)` array or PIL image.
        mask_type (`str`, *optional*, defaults to `"auto"`):
            - `"instance"`: every non-zero value is one object.
            - `"binary"`: every 4-connected component of non-zero pixels is one object.
            - `"semantic"`: every connected component of every non-zero class is one object.
            - `"auto"`: `"binary"` when the mask has a single non-zero value, `"instance"` otherwise.

    Any dtype works (bool, integers, floats; ids need not be contiguous). Raises a `ValueError` for a mask that is
    not 2-D (or 3-D with identical channels), a float mask with NaN or infinite values, a mask decoded from JPEG
    (see `check_lossless_mask`), or an unknown `mask_type`.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}.")
    arr = _mask_array(mask)
    values = np.unique(arr)
    values = values[values != 0]
    if mask_type == "auto":
        mask_type = "binary" if len(values) <= 1 else "instance"
    if mask_type == "instance":
        ids = np.searchsorted(values, arr).astype(np.int32) + 1
        return np.where(arr != 0, ids, 0).astype(np.int32)
    if mask_type == "binary":
        return ndimage.label(arr != 0)[0].astype(np.int32)
    out = np.zeros(arr.shape, np.int32)
    for value in values:
        components, _ = ndimage.label(arr == value)
        out[components > 0] = components[components > 0] + out.max()
    return out


def boxes_from_instances(instances: np.ndarray) -> np.ndarray:
    """Exact xyxy boxes `(N, 4)` in pixel coordinates of an instance map with ids 1..N.

    Coordinates are those of the outermost object pixels: `[x_min, y_min, x_max, y_max]`, inclusive.
    """
    n = int(instances.max()) if instances.size else 0
    boxes = np.zeros((n, 4), np.float32)
    for i, slc in enumerate(ndimage.find_objects(instances, max_label=n)):
        if slc is None:
            raise ValueError(f"Instance id {i + 1} is missing from an instance map with ids up to {n}.")
        boxes[i] = (slc[1].start, slc[0].start, slc[1].stop - 1, slc[0].stop - 1)
    return boxes


def paint_masks(masks: Sequence[np.ndarray], shape: tuple[int, int], skip: np.ndarray | None = None) -> np.ndarray:
    """Paint boolean masks into one `(H, W)` int64 map, mask `i` as `i + 1` and 0 where no mask is.

    Masks are painted largest first, so where masks overlap the smaller one wins and small objects inside larger
    ones stay visible (masks of equal area: the later one wins).

    Args:
        masks (`Sequence[np.ndarray]`): `N` boolean masks of shape `shape` (an `(N, H, W)` array or a list).
        shape (`tuple[int, int]`): `(H, W)`, which an empty `masks` cannot tell.
        skip (`np.ndarray`, *optional*): `(N,)` bool, masks left out of the painting.
    """
    areas = np.array([int(np.count_nonzero(m)) for m in masks], np.int64)
    painted = np.zeros(shape, np.int64)
    for i in np.argsort(-areas, kind="stable"):
        if skip is None or not skip[i]:
            painted[masks[i]] = i + 1
    return painted


def label_image(masks: np.ndarray) -> np.ndarray:
    """Merge `(N, H, W)` boolean masks into one `(H, W)` uint16 label image (object `i` -> label `i + 1`).

    Where masks overlap, the smaller object wins, so small objects inside larger ones stay visible.
    """
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"Expected masks of shape (N, H, W), got {masks.shape}.")
    if len(masks) >= np.iinfo(np.uint16).max:
        raise ValueError(f"Too many masks for a uint16 label image: {len(masks)}.")
    return paint_masks(masks, masks.shape[1:]).astype(np.uint16)


def instance_map(
    masks: np.ndarray, min_area: int = 0, max_area_fraction: float = 1.0
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Merge `(N, H, W)` masks into one instance map, dropping masks too large and objects too small.

    Masks covering more than `max_area_fraction` of the image are dropped first (a "mask" of the whole background);
    the rest are painted largest first, so where masks overlap the smaller one wins; objects left with fewer than
    `min_area` visible pixels (or none) are then dropped, and the remaining ids renumbered 1..K in mask order.

    Args:
        masks (`np.ndarray`): `(N, H, W)` bool masks.
        min_area (`int`, *optional*, defaults to 0): smallest visible object, in pixels.
        max_area_fraction (`float`, *optional*, defaults to 1.0): largest mask, as a fraction of `H * W`.

    Returns:
        `(instances, kept, counts)`: `(H, W)` uint16 instance map, the `(K,)` indices into `masks` of objects
        1..K, and the number of masks dropped as `too_large`, `too_small` and `hidden` (no visible pixel).
    """
    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"Expected masks of shape (N, H, W), got {masks.shape}.")
    n, height, width = masks.shape
    areas = masks.reshape(n, height * width).sum(1)
    large = areas > max_area_fraction * height * width
    painted = paint_masks(masks, (height, width), skip=large)
    visible = np.bincount(painted.ravel(), minlength=n + 1)[1:]
    hidden = (visible == 0) & ~large & (areas > 0)
    small = ~large & (visible < max(min_area, 1)) & ~hidden
    kept = np.flatnonzero(~large & ~hidden & ~small)
    if len(kept) >= np.iinfo(np.uint16).max:
        raise ValueError(f"{len(kept)} objects do not fit a 16-bit instance map.")
    lut = np.zeros(n + 1, np.uint16)
    lut[kept + 1] = np.arange(1, len(kept) + 1)
    counts = {"too_large": int(large.sum()), "too_small": int(small.sum()), "hidden": int(hidden.sum())}
    return lut[painted], kept, counts


def boxes_from_masks(masks: Any) -> np.ndarray:
    """Exact xyxy boxes `(K, 4)` of `(K, H, W)` masks, inclusive like `sam_hf.core.boxes_from_instances`.

    A box is `[x_min, y_min, x_max, y_max]` of the outermost pixels of its mask; an empty mask gives a row of NaN.
    Unlike `boxes_from_instances`, the masks may overlap.

    Masks are boxed one at a time (torchvision's `masks_to_boxes`), so a list of masks is never stacked: memory stays
    at one mask and its row and column profiles, however many masks there are.

    Args:
        masks: `(K, H, W)` boolean masks, a list of `(H, W)` masks, or one `(H, W)` mask.
    """
    masks = masks if isinstance(masks, list | tuple) else _as_masks(masks)
    boxes = np.full((len(masks), 4), np.nan, np.float32)
    for i, mask in enumerate(masks):
        mask = torch.as_tensor(np.asarray(mask, bool))[None]
        if mask.any():
            boxes[i] = masks_to_boxes(mask)[0].numpy()
    return boxes


def _as_masks(masks: Any, what: str = "masks") -> np.ndarray:
    """`(K, H, W)` bool from `(H, W)`, `(K, H, W)`, `(K, 1, H, W)` arrays, tensors or lists of `(H, W)` masks."""
    if isinstance(masks, (list, tuple)):
        masks = [np.asarray(m) for m in masks]
        arr = np.stack(masks) if masks else np.zeros((0, 0, 0), bool)
    else:
        arr = np.asarray(masks)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"Expected {what} of shape (K, H, W), got {arr.shape}.")
    return arr.astype(bool)

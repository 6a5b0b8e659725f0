"""COCO run-length encoding and polygons."""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

import numpy as np

#: Most pixels an RLE `size` may have: what a numpy array can index.
_MAX_PIXELS = np.iinfo(np.intp).max

#: Most 5-bit groups of one count of a compressed RLE string: 65 bits hold any 64-bit count.
_MAX_GROUPS = 13


def rle_string_to_counts(text: str) -> list[int]:
    """Decode pycocotools' compressed RLE string into run lengths.

    Each count is stored in groups of 5 bits, least significant first, each group as a character `48 + bits`, with
    `0x20` set while more groups follow and `0x10` of the last group as the sign. From the fourth count on, the value
    stored is the difference to the count two places earlier.

    Raises:
        ValueError: for a character outside `'0'..'o'`, a string that ends inside a count, or a count of more than
            13 groups (65 bits; pycocotools' counts are 64-bit).
    """
    counts: list[int] = []
    pos, n = 0, len(text)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError(f"the compressed RLE string ends inside a count (after {len(counts)} counts)")
            if shift >= 5 * _MAX_GROUPS:  # a longer count would only make a huge integer, slowly
                raise ValueError(
                    f"count {len(counts)} of the compressed RLE string has more than {_MAX_GROUPS} groups of 5 bits"
                )
            code = ord(text[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError(
                    f"character {text[pos]!r} at position {pos} is not a compressed RLE character ('0' to 'o')"
                )
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            pos += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_counts_to_string(counts: list[int] | np.ndarray) -> str:
    """Encode run lengths as pycocotools' compressed RLE string (the inverse of `rle_string_to_counts`)."""
    counts = [int(c) for c in counts]
    chars = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            code = value & 0x1F
            value >>= 5
            more = value != -1 if code & 0x10 else value != 0
            if more:
                code |= 0x20
            chars.append(chr(code + 48))
    return "".join(chars)


def rle_size(rle: Any) -> tuple[int, int]:
    """The `(height, width)` of a COCO RLE object, after checking its form; nothing is decoded.

    Args:
        rle: `{"size": [H, W], "counts": [int, ...] | str}`.

    Raises:
        ValueError: for something other than an object with `size` and `counts`, or a `size` that is not two
            non-negative integers (booleans, floats and strings are refused, not converted).
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"expected an RLE object with 'size' and 'counts', got {_short(rle)}")
    size = rle["size"]
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        raise ValueError(f"RLE 'size' must be [height, width] (non-negative integers), got {_short(size)}")
    height, width = int(size[0]), int(size[1])
    if height * width > _MAX_PIXELS:
        raise ValueError(f"RLE 'size' {height}x{width} (HxW) has more pixels than an array can hold")
    return height, width


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode COCO RLE, uncompressed (`counts` a list) or compressed (`counts` a string), into an `(H, W)` bool mask.

    Every run must be a non-negative integer and the runs must sum to `H * W`, summed as Python integers, before any
    array is made, so no run can wrap around a fixed-width integer on its way to numpy.

    Args:
        rle (`dict`): `{"size": [H, W], "counts": [int, ...] | str}`.

    Raises:
        ValueError: for a malformed `size` (see `rle_size`) or `counts`, a negative or non-integer run (booleans,
            floats and strings are refused, not converted), or runs that do not sum to `H * W`.
    """
    # Not pycocotools' decoder: its C loop writes each run without a bounds check, so the runs must be parsed and
    # checked here anyway, and numpy then expands the checked runs.
    height, width = rle_size(rle)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        counts = rle_string_to_counts(counts)
    elif not isinstance(counts, list | tuple):
        raise ValueError(
            f"RLE 'counts' must be a list of integers (uncompressed) or a string (compressed), got {_short(counts)}"
        )
    for i, count in enumerate(counts):
        if not _is_int(count):
            raise ValueError(f"RLE 'counts' must be non-negative integers; count {i} is {_short(count)}")
        if count < 0:
            raise ValueError(f"RLE 'counts' has a negative run at index {i}: {count}")
    total = sum(int(c) for c in counts)
    if total != height * width:
        raise ValueError(f"RLE runs sum to {total} pixels but 'size' {height}x{width} (HxW) has {height * width}")
    runs = np.asarray(counts, dtype=np.int64)  # each run is at most H * W, which fits (see rle_size)
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape((height, width), order="F")


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """Encode an `(H, W)` mask (non-zero = foreground) as COCO RLE.

    Args:
        mask (`np.ndarray`): `(H, W)` mask.
        compressed (`bool`, *optional*, defaults to `True`): `counts` as pycocotools' string, else a list of ints.

    Returns:
        `{"size": [H, W], "counts": str | list[int]}`.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"Expected an (H, W) mask, got shape {mask.shape}.")
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        counts: list[int] = []
    else:
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
        if flat[0]:
            counts = [0, *counts]
    return {"size": list(mask.shape), "counts": rle_counts_to_string(counts) if compressed else counts}


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons into an `(H, W)` bool mask: the union of the polygons, each filled by the even-odd
    rule at pixel centres (see the module docstring).

    Args:
        polygons (`list[list[float]]`): each `[x0, y0, x1, y1, ...]`, at least 3 points, in pixel coordinates.
        height (`int`) / width (`int`): size of the image.

    Example:

    ```python
    >>> polygons_to_mask([[10, 10, 20, 10, 20, 20, 10, 20]], 32, 32).sum()
    100
    ```
    """
    mask = np.zeros((height, width), bool)
    centres_x = np.arange(width) + 0.5
    for polygon in polygons:
        xy = np.asarray(polygon, np.float64).reshape(-1, 2)
        x0, y0 = xy[:, 0], xy[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        ring = np.zeros((height, width), bool)
        rows = np.arange(max(0, math.floor(y0.min())), min(height, math.ceil(y0.max()) + 1))
        for j in rows:
            y = j + 0.5
            # Half-open crossing rule: an edge counts where min(y0, y1) <= y < max(y0, y1); horizontal edges never.
            crosses = (np.minimum(y0, y1) <= y) & (y < np.maximum(y0, y1))
            if not crosses.any():
                continue
            xa, ya, xb, yb = x0[crosses], y0[crosses], x1[crosses], y1[crosses]
            xs = np.sort(xa + (y - ya) * (xb - xa) / (yb - ya))
            for left, right in zip(xs[0::2], xs[1::2]):
                # Pixel centres i + 0.5 in [left, right).
                ring[j] |= (centres_x >= left) & (centres_x < right)
        mask |= ring
    return mask


def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool (nor a float or string that would convert to one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if isinstance(value, list | dict | str | int | float) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Windows on an image: tile origins, object windows and the crop-scale check."""

from __future__ import annotations

from typing import Any

import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: a stride of `tile - overlap`, the last tile ending at the edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def tile_origins(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """`(y0, x0)` of every tile of an image, row by row."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"Expected tile_size >= 1 and 0 <= tile_overlap < tile_size, got {tile} and {overlap}.")
    return [(y, x) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def check_crop_scale(scale: float, name: str = "--object_crop_scale", off: bool = False) -> None:
    """Refuse an object-crop scale below 1, whose crops would not hold their boxes; with `off`, 0 (no crops) passes.
    `name` is the flag or setting the message names."""
    if isinstance(scale, bool) or not (scale >= 1 or (off and scale == 0)):
        either = " (or 0: off)" if off else ""
        raise ValueError(f"{name} must be >= 1{either} so that each crop holds its object, got {scale!r}.")


def object_window(box: Any, scale: float, height: int, width: int) -> tuple[int, int, int, int]:
    """`(y0, x0, y1, x1)` (end exclusive) of the square window around the xyxy `box` (inclusive pixel coordinates):
    `ceil(scale * longer side)` pixels, centred on the box, moved inside the image and cut to it where the image is
    smaller. With `scale >= 1` the window holds the whole box."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
    side = int(np.ceil(scale * max(x1 - x0 + 1, y1 - y0 + 1)))

    def span(low: float, high: float, size: int) -> tuple[int, int]:
        start = int(np.floor((low + high + 1) / 2 - side / 2 + 0.5))
        start = min(max(start, 0), max(size - side, 0))
        return start, min(start + side, size)

    (wy0, wy1), (wx0, wx1) = span(y0, y1, height), span(x0, x1, width)
    return wy0, wx0, wy1, wx1

"""Correction clicks: where a user (or a simulated one) clicks next to fix a mask."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def correction_clicks(
    logits: torch.Tensor, labels: torch.Tensor, input_side: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One correction click per object, drawn uniformly from its larger error region.

    Args:
        logits (`torch.Tensor`): `(N, m, m)` low-resolution mask logits of the previous round.
        labels (`torch.Tensor`): `(N, m, m)` soft targets in the same frame (`-100` for padded objects).
        input_side (`int`): side of the square model input; clicks are returned in its frame.
        generator (`torch.Generator`, *optional*): the draws' generator (on the logits' device).

    Returns:
        `points` `(N, 2)` xy in the input frame (pixel centres of the mask frame) and `labels` `(N,)`: 1 for a
        positive click (the region the mask missed is the larger), 0 for a negative one. An object whose mask is
        already exact, or a padded object, gets a click on its own target (or the frame centre) labelled 1.
    """
    n, m = logits.shape[0], logits.shape[-1]
    target = labels > 0.5
    pred = logits > 0
    missed, extra = target & ~pred, pred & ~target
    positive = missed.flatten(1).sum(1) >= extra.flatten(1).sum(1)
    region = torch.where(positive[:, None, None], missed, extra).flatten(1).float()
    # Nothing to correct: click inside the object (or anywhere, for padding) so that every row has a draw.
    empty = region.sum(1) == 0
    fallback = target.flatten(1).float()
    fallback[fallback.sum(1) == 0] = 1.0
    region[empty] = fallback[empty]
    positive = positive | empty
    index = torch.multinomial(region, 1, generator=generator)[:, 0]
    scale = input_side / m
    points = torch.stack([(index % m).float() + 0.5, (index // m).float() + 0.5], dim=1) * scale
    return points.reshape(n, 2), positive.long()


def next_click(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The click a careful user makes to correct `pred` towards `target` (both `(H, W)` bool).

    The larger of the missed and the wrongly covered regions is chosen (positive or negative click), and within it
    the pixel farthest from the region's boundary (ties: the first in row-major order). `None` when `pred` is exact.
    """
    missed, extra = target & ~pred, pred & ~target
    if not missed.any() and not extra.any():
        return None
    positive = missed.sum() >= extra.sum()
    region = missed if positive else extra
    # Pad by one pixel of background so that the image border counts as a boundary.
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([x, y], np.float64), int(positive)


def interior_point(target: np.ndarray) -> np.ndarray:
    """The object's pixel farthest from its boundary, xy: a deterministic "first click" on the object."""
    depth = ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return np.array([x, y], np.float64)

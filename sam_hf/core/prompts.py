"""Prompt validation: boxes, points and labels checked against the image they refer to."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class PromptError(ValueError):
    """A prompt that cannot be applied to the image (outside it, inverted, NaN, wrong shape)."""


def _as_array(value: Any, name: str, last_dim: int | None) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except OverflowError as err:
        raise PromptError(f"`{name}` holds a number too large to be a pixel coordinate.") from err
    except (TypeError, ValueError) as err:
        raise PromptError(f"`{name}` must be numeric, got {str(value)[:100]!r}.") from err
    if arr.size == 0:
        raise PromptError(f"`{name}` is empty; leave it out or give at least one prompt.")
    if last_dim is not None and (arr.ndim == 0 or arr.shape[-1] != last_dim):
        raise PromptError(f"`{name}` must have a last dimension of {last_dim}, got shape {arr.shape}.")
    return arr


def validate_prompts(
    image_size: tuple[int, int],
    boxes: Any = None,
    points: Any = None,
    point_labels: Any = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Check prompts against an image of `(height, width)` and return them as arrays.

    Args:
        image_size (`tuple[int, int]`): `(height, width)` of the original image.
        boxes: `(N, 4)` xyxy boxes in pixels, or one box `(4,)`.
        points: `(N, P, 2)` xy points in pixels, `P` points per prompt; `(P, 2)` is one prompt with `P` points.
        point_labels: `(N, P)` with 1 for a positive (foreground) and 0 for a negative point; defaults to all 1.

    Returns:
        `(boxes (N, 4), points (N, P, 2), point_labels (N, P))`, any of them `None` if not given.

    Raises:
        PromptError: with the index of the offending prompt for NaN or infinite coordinates, boxes or points
            outside `[0, width] x [0, height]`, inverted boxes (`x1 < x0` or `y1 < y0`), labels other than 0 and 1,
            mismatched counts, or no prompt at all.
    """
    height, width = image_size
    boxes = _as_array(boxes, "boxes", 4)
    points = _as_array(points, "points", 2)
    labels = _as_array(point_labels, "point_labels", None)
    if labels is not None and points is None:
        raise PromptError("`point_labels` were given without `points`.")
    if boxes is None and points is None:
        raise PromptError("Give at least one prompt: `boxes` and/or `points`.")
    if boxes is not None:
        boxes = boxes.reshape(-1, 4) if boxes.ndim == 1 else boxes
        if boxes.ndim != 2:
            raise PromptError(f"`boxes` must be (N, 4), got shape {boxes.shape}.")
        for i, box in enumerate(boxes.tolist()):
            x0, y0, x1, y1 = box
            if not np.isfinite([x0, y0, x1, y1]).all():
                raise PromptError(f"Box {i} has a NaN or infinite coordinate: {box}.")
            if x1 < x0 or y1 < y0:
                raise PromptError(f"Box {i} is inverted: expected x0 <= x1 and y0 <= y1 (xyxy), got {box}.")
            if min(x0, y0) < 0 or x1 > width or y1 > height:
                raise PromptError(
                    f"Box {i} {box} lies outside the {width}x{height} image (x in [0, {width}], y in [0, {height}])."
                )
    if points is not None:
        if points.ndim == 2:
            points = points[None]
        if points.ndim != 3:
            raise PromptError(f"`points` must be (N, P, 2) or (P, 2), got shape {points.shape}.")
        if labels is None:
            labels = np.ones(points.shape[:2])
        labels = labels.reshape(points.shape[:2]) if labels.size == math.prod(points.shape[:2]) else labels
        if labels.shape != points.shape[:2]:
            raise PromptError(
                f"`point_labels` must have shape {points.shape[:2]} to match `points`, got {labels.shape}."
            )
        if not np.isin(labels, (0, 1)).all():
            raise PromptError("`point_labels` must be 1 (positive) or 0 (negative).")
        for i, prompt in enumerate(points):
            if not np.isfinite(prompt).all():
                raise PromptError(f"Points of prompt {i} have a NaN or infinite coordinate: {prompt.tolist()}.")
            x, y = prompt[:, 0], prompt[:, 1]
            if (x < 0).any() or (y < 0).any() or (x > width).any() or (y > height).any():
                raise PromptError(f"Points of prompt {i} {prompt.tolist()} lie outside the {width}x{height} image.")
        if boxes is not None and len(boxes) != len(points):
            raise PromptError(
                f"With both boxes and points, each prompt has one box and its points: got {len(boxes)} boxes and "
                f"{len(points)} point sets."
            )
    return boxes, points, (labels.astype(np.int64) if labels is not None else None)

"""Interactive prompting: prompt types, correction clicks sampled from the error region, and the click curve.

Training (`--prompt_types`, `--num_correction_rounds`) follows the SAM paper's interactive recipe, as micro-sam does:
after the first prediction, one point is drawn from the error region (a positive point from what the mask missed,
a negative one from what it wrongly covered, whichever region is larger), the previous low-resolution logits are
fed back as the mask prompt, and the model predicts again; the losses of all rounds are summed.

Evaluation (`interactive_curve`) simulates a user: after each prediction it clicks the pixel of the larger error
region that lies deepest inside it (the maximum of its distance transform), positive or negative as above, and
feeds the previous logits back, giving Dice after 0, 1, ..., N correction clicks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "PROMPT_TYPES",
    "correction_clicks",
    "interactive_curve",
    "next_click",
    "parse_prompt_types",
]

PROMPT_TYPES = ("box", "point", "box+point")


def parse_prompt_types(value: str | Sequence[str]) -> tuple[str, ...]:
    """`"box,point"` -> `("box", "point")`, checking each against `PROMPT_TYPES`."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in PROMPT_TYPES]
    if not items or bad:
        raise ValueError(
            f"--prompt_types must be a comma-separated list of {', '.join(PROMPT_TYPES)}; got {value!r}"
            + (f" ({', '.join(map(repr, bad))} unknown)." if bad else ".")
        )
    return tuple(dict.fromkeys(items))


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


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else float(2 * (pred & target).sum() / total)


def interactive_curve(predictor: Any, target: np.ndarray, box: np.ndarray | None, num_clicks: int) -> list[float]:
    """Dice of one object after its first prompt and after each of `num_clicks` correction clicks.

    The image must already be set on `predictor` (`SamPredictor.set_image`). The first prompt is `box` (xyxy) when
    given, otherwise one positive click at the object's `interior_point`. Each correction adds `next_click` to the
    clicks so far and feeds the previous low-resolution logits back as `mask_input`. When the mask becomes exact,
    the remaining entries repeat its Dice (1.0).
    """
    points: list[np.ndarray] = []
    labels: list[int] = []
    if box is None:
        points.append(interior_point(target))
        labels.append(1)
    scores, mask_input = [], None
    for _ in range(num_clicks + 1):
        prompts: dict[str, Any] = {}
        if box is not None:
            prompts["boxes"] = np.asarray(box, np.float64)[None]
        if points:
            prompts["points"] = np.stack(points)[None]
            prompts["point_labels"] = np.asarray(labels)[None]
        result = predictor.predict(**prompts, mask_input=mask_input)
        pred = result.masks[0, 0]
        scores.append(_dice(pred, target))
        if len(scores) == num_clicks + 1:
            break
        click = next_click(pred, target)
        if click is None:
            scores.extend([scores[-1]] * (num_clicks + 1 - len(scores)))
            break
        points.append(click[0])
        labels.append(click[1])
        mask_input = result.logits[0, 0]
    return scores

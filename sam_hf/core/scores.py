"""The one place where Dice, IoU and average precision are computed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .masks import _as_masks


def object_stats(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Intersection, predicted area and ground-truth area of paired masks `(K, H, W)` -> `(K, 3)` float64.

    Every per-object Dice and IoU of sam_hf comes from these three counts (`scores_from_stats`), on any device.
    """
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    return torch.stack([(pred & target).sum(1), pred.sum(1), target.sum(1)], dim=1).double()


def scores_from_stats(stats: np.ndarray) -> dict[str, np.ndarray]:
    """Per-object Dice `2I / (P + G)` and IoU `I / (P + G - I)` from `(K, 3)` stats; empty-vs-empty scores 1."""
    inter, pred, gt = (np.asarray(stats, np.float64)[:, i] for i in range(3))
    denom = pred + gt
    dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
    iou = np.where(denom - inter > 0, inter / np.maximum(denom - inter, 1), 1.0)
    return {"dice": dice, "iou": iou}


def average_precision(scores: Any, hits: Any, num_objects: int) -> float:
    """Average precision of scored detections at one IoU threshold, as COCO computes it.

    Args:
        scores (`array-like`): `(M,)` confidence of each detection, over all images.
        hits (`array-like`): `(M,)` whether each detection is a true positive (see `match_masks`).
        num_objects (`int`): ground-truth objects over all images.

    Returns:
        The mean, over the 101 recall levels 0, 0.01, ..., 1, of the highest precision reached at that recall or
        above (0 where the recall is never reached). 0 when there are no objects.
    """
    if num_objects <= 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp = np.asarray(hits, np.float64)[order]
    if not len(tp):
        return 0.0
    true_positives = np.cumsum(tp)
    precision = true_positives / np.arange(1, len(tp) + 1)
    recall = true_positives / num_objects
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    first = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.where(first < len(tp), envelope[np.minimum(first, len(tp) - 1)], 0.0).mean())


def dice_per_object(pred_masks: Any, gt_masks: Any) -> np.ndarray:
    """Per-object Dice `2|P & G| / (|P| + |G|)` of paired `(K, H, W)` masks, as `sam_hf.training.metrics` computes it.

    Args:
        pred_masks: `(K, H, W)` predicted masks.
        gt_masks: `(K, H, W)` ground-truth masks, paired with `pred_masks` by index.

    Returns:
        `np.ndarray` of shape `(K,)`; an empty prediction of an empty object scores 1.
    """
    pred, gt = _as_masks(pred_masks, "predicted masks"), _as_masks(gt_masks, "ground-truth masks")
    if pred.shape != gt.shape:
        raise ValueError(f"Predicted masks {pred.shape} and ground-truth masks {gt.shape} must have the same shape.")
    if not len(pred):
        return np.zeros(0)
    return scores_from_stats(object_stats(torch.from_numpy(pred), torch.from_numpy(gt)).numpy())["dice"]


def match_masks(
    generated: Any, instances: np.ndarray, num_objects: int, scores: Any = None
) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Match generated masks against the objects `1..num_objects` of an instance map, one mask at a time.

    Returns:
        `(best, matched, count, hits)`: per object the best IoU of any generated mask `(num_objects,)` (0 if none),
        the number of generated masks whose best IoU with some object is at least 0.5, the number of masks, and per
        mask (in the order given) whether it is a true positive at IoU 0.5 when masks claim objects one to one in
        descending `scores` (the order given without scores), each taking the free object it overlaps most, as
        COCO's matching does.

    Intersections come from a histogram of the instance ids under each mask, so memory is one mask, one `(H, W)`
    instance map and a few arrays of `num_objects` numbers, whatever the number of objects or masks; no
    `(objects, H, W)` or `(masks, objects)` array is made.
    """
    flat = instances.ravel()
    gt_area = np.bincount(flat, minlength=num_objects + 1)[1 : num_objects + 1].astype(np.float64)
    best = np.zeros(num_objects)
    taken = np.zeros(num_objects, bool)
    generated = list(generated)
    order = np.arange(len(generated)) if scores is None else np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.zeros(len(generated), bool)
    matched = 0
    for i in order:
        mask = generated[i]
        mask = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=bool).ravel()
        inter = np.bincount(flat[mask], minlength=num_objects + 1)[1 : num_objects + 1].astype(np.float64)
        union = mask.sum() + gt_area - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        np.maximum(best, iou, out=best)
        matched += bool(num_objects and iou.max() >= 0.5)
        free = np.where(~taken & (iou >= 0.5))[0]
        if len(free):
            taken[free[np.argmax(iou[free])]] = hits[i] = True
    return best, matched, len(generated), hits

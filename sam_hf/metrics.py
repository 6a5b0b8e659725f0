"""Per-object Dice and IoU at the original image resolution."""

from __future__ import annotations

import numpy as np
import torch
from transformers import EvalPrediction

__all__ = ["compute_metrics", "object_stats", "scores_from_stats"]


def object_stats(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Intersection, predicted area and ground-truth area of boolean masks `(K, H, W)` -> `(K, 3)` float64."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    return torch.stack([(pred & target).sum(1), pred.sum(1), target.sum(1)], dim=1).double()


def scores_from_stats(stats: np.ndarray) -> dict[str, np.ndarray]:
    """Per-object Dice `2I / (P + G)` and IoU `I / (P + G - I)` from `(K, 3)` stats; empty-vs-empty scores 1."""
    inter, pred, gt = (np.asarray(stats, np.float64)[:, i] for i in range(3))
    denom = pred + gt
    dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
    iou = np.where(denom - inter > 0, inter / np.maximum(denom - inter, 1), 1.0)
    return {"dice": dice, "iou": iou}


def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for `SamTrainer`: mean per-object Dice and IoU (`eval_dice`, `eval_iou`).

    `eval_pred.predictions` holds `(N, K, 2)` intersection and predicted areas from `SamTrainer.prediction_step`, and
    `eval_pred.label_ids` the `(N, K)` ground-truth areas; padded objects are -100.
    """
    predictions = np.asarray(eval_pred.predictions).reshape(-1, 2)
    gt_area = np.asarray(eval_pred.label_ids).reshape(-1, 1)
    stats = np.concatenate([predictions, gt_area], axis=1)
    stats = stats[gt_area[:, 0] >= 0]
    scores = scores_from_stats(stats)
    return {"dice": float(scores["dice"].mean()), "iou": float(scores["iou"].mean()), "num_objects": len(stats)}

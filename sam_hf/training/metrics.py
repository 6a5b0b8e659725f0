"""Per-object Dice and IoU at the original image resolution."""

from __future__ import annotations

import numpy as np
from transformers import EvalPrediction

from ..core.scores import scores_from_stats


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

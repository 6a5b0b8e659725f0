"""Per-object Dice and IoU for promptable segmentation, as an `evaluate` module.

This file is self-contained (it imports only numpy, datasets and evaluate) so that `evaluate.load` can load it by
path, offline, without the Hub:

```python
>>> import evaluate, sam_hf.evaluation.object_metrics
>>> metric = evaluate.load(sam_hf.evaluation.object_metrics.__file__)
>>> metric.compute(predictions=[[[1, 1], [0, 0]]], references=[[[1, 0], [0, 0]]])["mean_dice"]
0.666...
```

`SamObjectMetrics()` can also be instantiated directly.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Per-object Dice (2|P∩G| / (|P| + |G|)) and IoU (|P∩G| / |P∪G|) of binary masks, one prediction and one reference
mask per object (per prompt), at whatever resolution they are given (sam_hf uses the original image resolution).
An object whose prediction and reference are both empty scores 1. Reports the mean, the median and the number of
objects, and optionally the per-object scores and reference areas.
"""


_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2D arrays): predicted binary masks, one per object (non-zero = foreground).
    references (`list` of 2D arrays): ground-truth binary masks, same shapes as the predictions.
    return_per_object (`bool`, *optional*, defaults to `False`): also return `dice`, `iou` and `area` arrays.
Returns:
    `mean_dice`, `median_dice`, `mean_iou`, `median_iou`, `num_objects`; with `return_per_object`, `dice`, `iou`
    (per-object scores) and `area` (reference areas in pixels).
Examples:
    >>> metric = SamObjectMetrics()
    >>> metric.compute(predictions=[[[1, 1], [0, 0]]], references=[[[1, 0], [0, 0]]])["mean_iou"]
    0.5
"""


_CITATION = """\
@article{kirillov2023segany,
  title={Segment Anything},
  author={Kirillov, Alexander and Mintun, Eric and Ravi, Nikhila and others},
  journal={arXiv:2304.02643},
  year={2023}
}
"""


def dice_iou(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float, int]:
    """Dice, IoU and reference area of one pair of binary masks of the same shape."""
    pred, ref = np.asarray(pred) != 0, np.asarray(ref) != 0
    if pred.shape != ref.shape:
        raise ValueError(f"A prediction of shape {pred.shape} was paired with a reference of shape {ref.shape}.")
    inter, p, g = int((pred & ref).sum()), int(pred.sum()), int(ref.sum())
    union = p + g - inter
    return (2 * inter / (p + g) if p + g else 1.0), (inter / union if union else 1.0), g


class SamObjectMetrics(evaluate.Metric):
    """Per-object Dice and IoU (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("bool")))
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
            reference_urls=["https://arxiv.org/abs/2304.02643"],
        )

    def _compute(self, predictions, references, return_per_object: bool = False) -> dict:
        rows = [dice_iou(p, r) for p, r in zip(predictions, references)]
        dice = np.array([r[0] for r in rows], np.float64)
        iou = np.array([r[1] for r in rows], np.float64)
        out = {
            "mean_dice": float(dice.mean()) if len(rows) else float("nan"),
            "median_dice": float(np.median(dice)) if len(rows) else float("nan"),
            "mean_iou": float(iou.mean()) if len(rows) else float("nan"),
            "median_iou": float(np.median(iou)) if len(rows) else float("nan"),
            "num_objects": len(rows),
        }
        if return_per_object:
            out.update(dice=dice, iou=iou, area=np.array([r[2] for r in rows], np.int64))
        return out

"""The per-object Dice/IoU `evaluate` module, by hand, and against the one Dice/IoU of `sam_hf.core.scores`."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
import torch
from conftest import numpy_dice_iou

import sam_hf.evaluation.object_metrics
from sam_hf.core.scores import dice_per_object, object_stats, scores_from_stats
from sam_hf.evaluation.boxes import load_object_metrics


@pytest.mark.parametrize(
    ("pred", "ref", "dice", "iou"),
    [
        ([[1, 1], [0, 0]], [[1, 0], [0, 0]], 2 / 3, 1 / 2),  # |P|=2, |G|=1, |P&G|=1
        ([[1, 1, 1]], [[0, 1, 1]], 4 / 5, 2 / 3),
        ([[0, 0]], [[1, 1]], 0.0, 0.0),
        ([[0, 0]], [[0, 0]], 1.0, 1.0),  # empty vs empty scores 1
        ([[1, 0], [0, 1]], [[1, 0], [0, 1]], 1.0, 1.0),
    ],
)
def test_object_metrics_module_by_hand(pred, ref, dice, iou):
    metric = evaluate.load(sam_hf.evaluation.object_metrics.__file__)  # by path: no Hub
    out = metric.compute(predictions=[pred], references=[ref], return_per_object=True)
    assert out["mean_dice"] == pytest.approx(dice) and out["mean_iou"] == pytest.approx(iou)
    assert out["num_objects"] == 1 and out["area"][0] == np.sum(ref)


def test_object_metrics_batches_and_shape_errors():
    metric = load_object_metrics()
    metric.add_batch(predictions=[[[1, 1]], [[1, 0, 0]]], references=[[[1, 0]], [[1, 1, 0]]])
    metric.add(predictions=[[0]], references=[[1]])
    out = metric.compute()
    # Dice 2/3, 2/3, 0 -> mean 4/9, median 2/3; IoU 1/2, 1/2, 0.
    assert out["mean_dice"] == pytest.approx(4 / 9) and out["median_dice"] == pytest.approx(2 / 3)
    assert out["mean_iou"] == pytest.approx(1 / 3) and out["num_objects"] == 3
    with pytest.raises(ValueError, match="shape"):
        load_object_metrics().compute(predictions=[[[1, 1]]], references=[[[1, 1, 1]]])


def test_the_module_and_core_scores_agree_on_random_masks():
    """The module keeps its own formula (evaluate.load runs the file outside the package): it must not drift from
    `core.scores`, which training, evaluation figures and the interactive curve use."""
    rng = np.random.default_rng(0)
    pred = rng.random((64, 9, 7)) < rng.random((64, 1, 1))  # densities from empty to full
    ref = rng.random((64, 9, 7)) < rng.random((64, 1, 1))
    pred[:3], ref[:2] = False, False  # empty vs empty, and empty predictions of present objects
    module = load_object_metrics().compute(predictions=pred.tolist(), references=ref.tolist(), return_per_object=True)
    core = scores_from_stats(object_stats(torch.from_numpy(pred), torch.from_numpy(ref)).numpy())
    expected = np.array([numpy_dice_iou(p, r) for p, r in zip(pred, ref)])
    np.testing.assert_allclose(module["dice"], expected[:, 0])
    np.testing.assert_allclose(module["iou"], expected[:, 1])
    np.testing.assert_allclose(core["dice"], expected[:, 0])
    np.testing.assert_allclose(core["iou"], expected[:, 1])
    np.testing.assert_allclose(dice_per_object(pred, ref), expected[:, 0])

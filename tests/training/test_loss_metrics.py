from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from sam_hf import SamDiceCELoss
from sam_hf.core.scores import object_stats, scores_from_stats
from sam_hf.training.loss import iou_prediction_loss, multimask_loss
from sam_hf.training.metrics import compute_metrics


def _reference(logits: torch.Tensor, target: torch.Tensor, lambda_dice: float, lambda_ce: float) -> torch.Tensor:
    """DiceCE written out by hand: per-object soft Dice loss + mean BCE over all pixels."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1e-5) / (p.sum(1) + t.sum(1) + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return lambda_dice * dice.mean() + lambda_ce * bce


@pytest.mark.parametrize("lambda_dice,lambda_ce", [(1.0, 1.0), (1.0, 0.0), (0.5, 2.0)])
def test_loss_matches_monai_and_hand_formula(lambda_dice, lambda_ce):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16)
    labels = (torch.rand(2, 3, 16, 16) > 0.7).float()
    labels[1, 2] = -100  # a padded object
    loss, n = SamDiceCELoss(lambda_dice, lambda_ce)(logits, labels)
    assert n == 5
    valid = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    lv = torch.stack([logits[i, j] for i, j in valid])
    tv = torch.stack([labels[i, j] for i, j in valid])
    monai = DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)(lv[:, None], tv[:, None])
    torch.testing.assert_close(loss, monai)
    torch.testing.assert_close(loss, _reference(lv, tv, lambda_dice, lambda_ce), rtol=1e-5, atol=1e-6)


def test_per_object_loss_averages_to_the_monai_loss():
    torch.manual_seed(1)
    logits, labels = torch.randn(4, 8, 8), (torch.rand(4, 8, 8) > 0.5).float()
    fn = SamDiceCELoss(0.7, 1.3)
    per = fn.per_object(logits, labels)
    assert per.shape == (4,)
    torch.testing.assert_close(per.mean(), fn(logits[None], labels[None])[0])
    torch.testing.assert_close(per[2], _reference(logits[2:3], labels[2:3], 0.7, 1.3), rtol=1e-5, atol=1e-6)


def test_multimask_loss_takes_the_best_candidate_and_real_iou():
    labels = torch.zeros(1, 2, 4, 4)
    labels[0, 0, :2, :2] = 1  # 4 px object
    labels[0, 1] = -100  # padding
    logits = torch.full((1, 2, 3, 4, 4), -20.0)
    logits[0, 0, 1, :2, :2] = 20.0  # candidate 1: exact
    logits[0, 0, 2, :2, :] = 20.0  # candidate 2: 8 px covering the object, IoU 4/8
    scores = torch.tensor([[[0.1, 0.9, 0.3], [0.5, 0.5, 0.5]]])
    fn = SamDiceCELoss()
    mask_loss, iou_loss, n = multimask_loss(fn, logits, scores, labels)
    assert n == 1
    torch.testing.assert_close(mask_loss, fn.per_object(logits[0, 0, 1:2], labels[0, 0:1])[0])
    # Actual IoUs: 0 (empty prediction), 1, 0.5.
    torch.testing.assert_close(iou_loss, ((0.1 - 0.0) ** 2 + (0.9 - 1.0) ** 2 + (0.3 - 0.5) ** 2) / 3 * torch.ones(()))
    with pytest.raises(ValueError, match="Expected logits"):
        multimask_loss(fn, logits[:, :, 0], scores, labels)


def test_loss_rejects_bad_shapes_and_weights():
    with pytest.raises(ValueError, match="same shape"):
        SamDiceCELoss()(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 4))
    with pytest.raises(ValueError, match="not both 0"):
        SamDiceCELoss(0.0, 0.0)


def test_object_scores_by_hand():
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred[0, 0, :4] = True  # 4 px
    gt[0, 0, 1:4] = True
    gt[0, 1, 0:3] = True  # 6 px, overlap 3
    gt[1, 3, 3] = True  # object 2: predicted nothing
    stats = object_stats(pred, gt).numpy()
    np.testing.assert_array_equal(stats, [[3, 4, 6], [0, 0, 1]])
    scores = scores_from_stats(stats)
    np.testing.assert_allclose(scores["dice"], [6 / 10, 0.0])
    np.testing.assert_allclose(scores["iou"], [3 / 7, 0.0])


def test_compute_metrics_ignores_padding():
    from transformers import EvalPrediction

    stats = np.array([[[3, 4, 6], [-100, -100, -100]], [[2, 2, 2], [1, 3, 1]]], np.float64)
    m = compute_metrics(EvalPrediction(predictions=stats[..., :2], label_ids=stats[..., 2]))
    assert m["num_objects"] == 3
    assert m["dice"] == pytest.approx((0.6 + 1.0 + 0.5) / 3)
    assert m["iou"] == pytest.approx((3 / 7 + 1.0 + 1 / 3) / 3)


def test_iou_prediction_loss_of_the_single_mask_output():
    """MSE between the predicted and the actual IoU of each real object's mask; padded objects do not count, and
    only the predictions get a gradient."""
    labels = torch.full((1, 3, 4, 4), -100.0)
    labels[0, :2] = 0.0
    labels[0, 0, :2, :2] = 1.0  # 4 pixels
    labels[0, 1, :, :1] = 1.0  # 4 pixels
    logits = torch.full((1, 3, 4, 4), -5.0, requires_grad=True)
    with torch.no_grad():
        logits[0, 0, :2, :] = 5.0  # 8 pixels, 4 of them right: IoU 0.5
        logits[0, 1, :, :1] = 5.0  # exact: IoU 1
    scores = torch.tensor([[0.7, 0.6, 0.9]], requires_grad=True)
    loss = iou_prediction_loss(logits, scores, labels)
    torch.testing.assert_close(loss, torch.tensor(((0.7 - 0.5) ** 2 + (0.6 - 1.0) ** 2) / 2))
    loss.backward()
    assert logits.grad is None or not logits.grad.any()
    torch.testing.assert_close(scores.grad, torch.tensor([[0.2, -0.4, 0.0]]))
    # The same as multimask_loss's IoU term for one candidate.
    _, mm_iou, _ = multimask_loss(SamDiceCELoss(), logits[:, :, None], scores[..., None], labels)
    torch.testing.assert_close(mm_iou, loss)
    # No real object: zero, still connected to the predictions.
    assert iou_prediction_loss(logits, scores, torch.full_like(labels, -100.0)).item() == 0.0

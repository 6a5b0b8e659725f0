"""DiceCE loss on SAM mask logits, with MONAI's `DiceCELoss` underneath."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from ..core.scores import object_stats


class SamDiceCELoss(torch.nn.Module):
    """Dice + binary cross-entropy per object, averaged over the objects that are not padding.

    Each object is one sample for MONAI's `DiceCELoss(sigmoid=True)`: its Dice term is computed per object
    (`batch=False`) and its cross-entropy is the mean over the object's pixels, so the result is the mean over objects
    of `lambda_dice * dice_loss + lambda_ce * bce`.

    Args:
        lambda_dice (`float`, *optional*, defaults to 1.0): weight of the Dice term.
        lambda_ce (`float`, *optional*, defaults to 1.0): weight of the cross-entropy term.

    Shapes:
        - `logits`: `(B, K, m, m)` mask logits, one channel per object (`multimask_output=False`).
        - `labels`: `(B, K, m, m)` targets in [0, 1]; padded objects are `-100` everywhere.

    Returns:
        `(loss, num_objects)`: the mean loss over real objects and how many there were.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0 or lambda_dice + lambda_ce == 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0 and not both 0, got {lambda_dice}, {lambda_ce}.")
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.dice_ce = DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce, reduction="mean")
        self.dice = DiceLoss(sigmoid=True, reduction="none")

    def per_object(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Unreduced loss `(N,)` of `N` objects, logits and labels `(N, m, m)`: the same Dice + BCE terms as `forward`
        (whose value is the mean of this over the real objects)."""
        logits, labels = logits[:, None].float(), labels[:, None].float()
        dice = self.dice(logits, labels).flatten()
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").flatten(1).mean(1)
        return self.lambda_dice * dice + self.lambda_ce * bce

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        if logits.shape != labels.shape or logits.dim() != 4:
            raise ValueError(
                f"Expected logits and labels of the same shape (B, K, m, m), got {tuple(logits.shape)} "
                f"and {tuple(labels.shape)}."
            )
        valid = labels[:, :, 0, 0] != -100
        n = int(valid.sum())
        if n == 0:
            return logits.sum() * 0.0, 0
        return self.dice_ce(logits[valid][:, None].float(), labels[valid][:, None].float()), n


def multimask_loss(
    loss_fn: SamDiceCELoss,
    logits: torch.Tensor,
    iou_scores: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Best-of-3 mask loss and IoU-prediction loss for SAM's multimask outputs, as SAM itself was trained.

    Shapes:
        - `logits`: `(B, K, 3, m, m)` mask logits (`multimask_output=True`).
        - `iou_scores`: `(B, K, 3)` the IoU head's predictions.
        - `labels`: `(B, K, m, m)` targets; padded objects are `-100`.

    Returns:
        `(mask_loss, iou_loss, num_objects)`: the mean over real objects of the lowest of the three candidates'
        DiceCE (only the best candidate gets a gradient), and the mean squared error between each candidate's
        predicted IoU and its actual IoU with the target (mask logit > 0 against label > 0.5). With
        `reduction="sum"`, both are sums over the real objects instead (the IoU term of each object being the mean
        over its three candidates), for callers that normalise by another count.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if logits.dim() != 5 or logits.shape[:2] != labels.shape[:2] or logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(
            f"Expected logits (B, K, C, m, m) and labels (B, K, m, m), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    valid = labels[:, :, 0, 0] != -100
    n = int(valid.sum())
    if n == 0:
        return logits.sum() * 0.0, iou_scores.sum() * 0.0, 0
    logits, scores, labels = logits[valid], iou_scores[valid], labels[valid]  # (n, C, m, m), (n, C), (n, m, m)
    c = logits.shape[1]
    per = loss_fn.per_object(logits.flatten(0, 1), labels.repeat_interleave(c, 0)).view(-1, c)
    target_iou = actual_iou(logits, labels[:, None].expand_as(logits))
    mask_loss, iou_loss = per.min(dim=1).values, ((scores.float() - target_iou) ** 2).mean(dim=1)
    if reduction == "sum":
        return mask_loss.sum(), iou_loss.sum(), n
    return mask_loss.mean(), iou_loss.mean(), n


@torch.no_grad()
def actual_iou(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted mask (logit > 0) with its target (label > 0.5), float32 and without gradient.

    `logits` and `labels` have the same shape `(..., m, m)`; the result has the leading shape. An empty prediction
    of an empty target counts as a perfect match (IoU 1).
    """
    lead = logits.shape[:-2]
    pred, target = (logits > 0).flatten(0, -3), (labels > 0.5).flatten(0, -3)
    inter, pred_area, gt_area = object_stats(pred, target).unbind(-1)
    union = pred_area + gt_area - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).float().view(lead)


def iou_prediction_loss(logits: torch.Tensor, iou_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the IoU head's prediction for each object's mask and that mask's actual IoU with
    the target, over the real objects: the IoU term of `multimask_loss` for single-mask output.

    Shapes:
        - `logits`: `(B, K, m, m)` mask logits (`multimask_output=False`, `pred_masks[:, :, 0]`).
        - `iou_scores`: `(B, K)` the IoU head's predictions for those masks (`iou_scores[:, :, 0]`).
        - `labels`: `(B, K, m, m)` targets; padded objects are `-100`.

    The target IoU carries no gradient: only the IoU head (and the layers under the IoU token) learn from this term.
    """
    if logits.dim() != 4 or logits.shape != labels.shape or iou_scores.shape != logits.shape[:2]:
        raise ValueError(
            f"Expected logits and labels (B, K, m, m) and iou_scores (B, K), got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)} and {tuple(iou_scores.shape)}."
        )
    valid = labels[:, :, 0, 0] != -100
    if not valid.any():
        return iou_scores.sum() * 0.0
    return F.mse_loss(iou_scores[valid].float(), actual_iou(logits[valid], labels[valid]))

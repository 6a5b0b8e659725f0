"""DiceCE loss on SAM mask logits, with MONAI's `DiceCELoss` underneath."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss

__all__ = ["SamDiceCELoss"]


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
        self.dice_ce = DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce, reduction="mean")

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

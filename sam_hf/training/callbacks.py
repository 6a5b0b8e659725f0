"""Trainer callbacks: prompt epochs and finite gradients."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback


class PromptEpochCallback(TrainerCallback):
    """Tell the training dataset's transform which epoch starts, so its prompt draws are keyed by `(seed, epoch, row)`.

    Runs before the epoch's dataloader iterator (and its workers) is created, also when resuming mid-epoch.
    """

    def __init__(self, transform: Any):
        self.transform = transform

    @classmethod
    def for_dataset(cls, dataset: Any) -> PromptEpochCallback:
        """The callback for the transform a `Dataset.with_transform` attached (none for other datasets)."""
        return cls((getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform"))

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(math.floor(state.epoch + 1e-9))


class FiniteGradientCallback(TrainerCallback):
    """Stop before an optimizer step whose gradients hold NaN or infinity, which would make every weight NaN.

    Not under `--fp16`, whose gradient scaler skips such steps on purpose.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)):
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            raise FloatingPointError(
                f"Non-finite gradients at step {state.global_step} in {len(bad)} parameter(s), e.g. {bad[:3]}: "
                "stopping before the optimizer makes the weights NaN. Check the learning rate, the precision and "
                "the inputs."
            )

"""`SamObjective`: the training loss of a SAM-family model, one method per decoder pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..config.arguments import parse_prompt_types
from ..core.clicks import correction_clicks
from ..data.transforms import LABEL_PAD
from ..family.geometry import Geometry
from ..family.registry import FamilyMember, as_levels
from .loss import SamDiceCELoss, iou_prediction_loss, multimask_loss


class SamObjective:
    """The loss `SamTrainer.compute_loss` minimises: the first prompted pass, and, when they are on, the multimask
    point pass, the background-point loss and the correction rounds, each decoded on the same image features.

    First pass: the decoder is prompted with each object's box (or point, or both: `prompt_types`, one per step) with
    `multimask_output=False`, and `loss_fn` (DiceCE) scores its mask per object.

    IoU prediction: with `multimask_output=False` the model's `iou_scores[:, :, 0]` is the IoU head's prediction for
    the mask it returns (mask token 0). Unless `iou_loss_weight` is 0, the loss adds `iou_loss_weight` times the mean
    squared error between it and that mask's actual IoU with the target (`sam_hf.training.iou_prediction_loss`), so
    that `iou_scores` keep meaning "expected IoU" while the decoder changes, in training and evaluation loss alike.

    Multimask point pass: when a training batch also carries `input_points` (one point per object), a second decoder
    call prompts every `multimask_every`-th object of each image (starting at an offset that cycles with the step) with
    its point and `multimask_output=True`, as automatic mask generation does, and adds the best-of-3 DiceCE and the
    IoU-prediction loss (`sam_hf.training.multimask_loss`) summed over those objects and divided by the box-prompted
    objects. All four mask tokens and the IoU head then learn, so `pipeline("mask-generation")` keeps working (and
    benefits) after tuning. `train.py` uses `multimask_every=8` by default and 1 with `--multimask_training`. Rows
    flagged `point_only` (`--point_crop_scale`) are point-prompted at every step and take no box loss. When batches
    also carry `background_points` (`SamTransform(background_points=True)`), a third call prompts one point on no
    object per image, whose masks learn to be empty and whose predicted IoUs 0 (`background_loss`, weighted by
    `background_point_weight`).

    Correction rounds: with `num_correction_rounds`, each training step adds that many rounds of one simulated
    correction click per object (`sam_hf.core.clicks`), each scored like the first pass.

    Args:
        family (`FamilyMember`): what differs between SAM, SAM-HQ and SAM 2-style models (`sam_hf.family.family_of`).
        geometry (`Geometry`): the model's mask geometry (`family.geometry(model.config)`).
        loss_fn (`SamDiceCELoss`, *optional*): the mask loss; defaults to equal Dice and CE weights.
        iou_loss_weight (`float`, *optional*, defaults to 1.0): weight of the IoU-prediction losses, of the
            box-prompted mask and, when batches carry point prompts (`SamTransform(point_prompts=True)`,
            the default of `train.py`), of the three multimask candidates. With 0 and no point prompts, freeze the IoU
            head (`freeze_unused_decoder_outputs(model, train_iou_head=False)`).
        multimask_every (`int`, *optional*, defaults to 1): with point prompts, point-prompt every this many objects
            of each image in the multimask pass (1: all of them, `--multimask_training`; 0: no multimask pass).
        background_point_weight (`float`, *optional*, defaults to 0.1): weight of the background-point loss, when
            batches carry background points; 0 skips that decoder call.
        prompt_types (`tuple[str, ...]`, *optional*, defaults to `("box",)`): the prompt types of the first pass,
            one per training step in turn (`sam_hf.config.parse_prompt_types`); evaluation uses boxes.
        num_correction_rounds (`int`, *optional*, defaults to 0): correction rounds per training step.
    """

    def __init__(
        self,
        family: FamilyMember,
        geometry: Geometry,
        loss_fn: SamDiceCELoss | None = None,
        iou_loss_weight: float = 1.0,
        multimask_every: int = 1,
        background_point_weight: float = 0.1,
        prompt_types: tuple[str, ...] = ("box",),
        num_correction_rounds: int = 0,
    ):
        self.family = family
        self.geometry = geometry
        self.loss_fn = loss_fn if loss_fn is not None else SamDiceCELoss()
        self.iou_loss_weight = iou_loss_weight
        if multimask_every < 0:
            raise ValueError(f"multimask_every must be >= 0 (0: no multimask pass), got {multimask_every}.")
        self.multimask_every = multimask_every
        if background_point_weight < 0:
            raise ValueError(f"background_point_weight must be >= 0, got {background_point_weight}.")
        self.background_point_weight = background_point_weight
        self.prompt_types = parse_prompt_types(prompt_types)
        if num_correction_rounds < 0:
            raise ValueError(f"num_correction_rounds must be >= 0, got {num_correction_rounds}.")
        self.num_correction_rounds = num_correction_rounds

    def prompt_kind(self, step: int, training: bool) -> str:
        """The prompt type of training step `step`: `prompt_types` in turn, one per step; evaluation uses boxes."""
        return self.prompt_types[step % len(self.prompt_types)] if training else "box"

    def __call__(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        step: int,
        seed: int = 0,
        process_index: int = 0,
        unwrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> tuple[torch.Tensor, int, Any]:
        """The loss of one batch: the first pass, then the passes that are on (in training only).

        Each term is a sum over objects divided by the box-prompted objects of the batch (the first pass's DiceCE is
        their mean), so that `SamTrainer` can rescale the total to the objects of the whole accumulation window.

        Args:
            model (`torch.nn.Module`): the model as the Trainer runs it (possibly wrapped); `model.training` turns the
                training-only passes on.
            inputs (`dict`): a batch of `SamDataCollator`.
            step (`int`): the optimizer step (`TrainerState.global_step`): the prompt type and the objects of the
                point pass cycle with it.
            seed (`int`, *optional*, defaults to 0): the run's seed, and `process_index` this process's rank: with
                `step`, they seed the correction clicks.
            process_index (`int`, *optional*, defaults to 0): see `seed`.
            unwrap_model (`Callable`, *optional*): returns the model under a distributed or compiled wrapper
                (`Accelerator.unwrap_model`), whose vision encoder the later passes share; defaults to the model.

        Returns:
            `(loss, num_objects, outputs)`: the scalar loss, the number of box-prompted (real) objects and the first
            pass's model outputs.
        """
        labels = inputs["labels"]
        multimask = bool(self.multimask_every) and "input_points" in inputs and model.training
        rounds = self.num_correction_rounds if model.training else 0
        kind = self.prompt_kind(step, model.training)
        outputs, features = self.first_pass(model, inputs, kind, bool(multimask or rounds), unwrap_model)
        logits = outputs.pred_masks[:, :, 0]
        loss, n_objects = self.mask_loss(logits, outputs.iou_scores[:, :, 0], labels)
        if multimask:
            mask_sum, iou_sum = self.point_pass_loss(model, inputs, features, labels, step)
            # A sum over the chosen objects per box-prompted object: the scaling in `SamTrainer.compute_loss` turns it
            # into a sum over the chosen objects divided by the objects of the whole accumulation window, which
            # gradient accumulation does not change. With every object chosen, it is the mean best-of-3 and IoU loss.
            loss = loss + (mask_sum + self.iou_loss_weight * iou_sum) / max(n_objects, 1)
            if self.background_point_weight and "background_points" in inputs:
                background = self.background_loss(model, inputs, features)
                loss = loss + self.background_point_weight * background / max(n_objects, 1)
        if rounds:
            click_seed = hash((seed, step, process_index)) % 2**63
            loss = loss + self.correction_loss(model, inputs, features, logits, labels, kind, rounds, click_seed)
        return loss, n_objects, outputs

    def mask_loss(
        self, logits: torch.Tensor, iou_scores: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """DiceCE of single-mask logits `(B, K, m, m)`, plus `iou_loss_weight` times the IoU-prediction loss of their
        `iou_scores` `(B, K)`; and the number of real objects.

        With `multimask_output=False` the decoder returns the IoU head's prediction for mask token 0, the mask it
        outputs: the IoU term teaches it that mask's actual IoU, so that `iou_scores` rank masks by quality.
        """
        loss, n_objects = self.loss_fn(logits, labels)
        if self.iou_loss_weight:
            loss = loss + self.iou_loss_weight * iou_prediction_loss(logits, iou_scores, labels)
        return loss, n_objects

    def image_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The model's image-side keyword arguments: `pixel_values`, or the cached features in the family's form."""
        if "image_embeddings" in inputs:
            return self.family.decoder_inputs(as_levels(inputs["image_embeddings"]))
        return {"pixel_values": inputs["pixel_values"]}

    def first_pass(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        kind: str,
        reuse: bool,
        unwrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> tuple[Any, tuple[torch.Tensor, ...] | None]:
        """The first prompted call (`kind`: box, point or box+point), with `multimask_output=False`.

        Returns its outputs and the image features the later decoder calls get instead of `pixel_values` (`None`
        when the batch carries `pixel_values` and `reuse` is false: no later call). With `reuse` and `pixel_values`,
        the image encoder still runs once: a frozen one before this call, without gradient; a learning one (LoRA,
        unfrozen) inside it, through the (possibly distributed) model, its output kept by a forward hook so that
        every later loss reaches it.
        """
        hook = None
        if reuse and "pixel_values" in inputs:
            unwrapped = unwrap_model(model) if unwrap_model is not None else model
            vision = self.family.vision_encoder(unwrapped)
            if not any(p.requires_grad for p in vision.parameters()):
                # Several decoder calls follow; run the frozen encoder once for all (no gradient flows through it).
                with torch.no_grad():
                    features = self.family.encode(unwrapped, inputs["pixel_values"])
                inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
                inputs["image_embeddings"] = list(features) if len(features) > 1 else features[0]
            else:
                captured: list[Any] = []
                hook = vision.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            outputs = self._forward(model, inputs, kind, multimask_output=False)
        finally:
            if hook is not None:
                hook.remove()
        if hook is not None:
            return outputs, self.family.capture(captured[-1], outputs)
        if "image_embeddings" in inputs:
            return outputs, as_levels(inputs["image_embeddings"])
        return outputs, None

    def _forward(self, model: torch.nn.Module, inputs: dict[str, Any], kind: str = "box", **kwargs: Any):
        """A prompted call (`kind`: box, point or box+point): the model gets only the inputs it uses (its forward
        ignores unknown keys)."""
        prompts = {}
        if "box" in kind:
            prompts["input_boxes"] = inputs["input_boxes"]
        if "point" in kind:
            prompts["input_points"], prompts["input_labels"] = inputs["input_points"], inputs["input_labels"]
        return model(**self.image_inputs(inputs), **prompts, **self.family.forward_kwargs, **kwargs)

    def _decode_points(self, model, features, points: torch.Tensor, point_labels: torch.Tensor, rows=None):
        """A multimask decoder call with the given point prompts on this batch's image `features`, or on those of its
        `rows` only (a 1-D index tensor; the prompts given are then already those rows')."""
        features = features if rows is None else tuple(f[rows] for f in features)
        return model(
            **self.family.decoder_inputs(features),
            input_points=points,
            input_labels=point_labels,
            multimask_output=True,
            **self.family.forward_kwargs,
        )

    def point_pass_loss(
        self, model, inputs, features, labels: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed best-of-3 mask loss and IoU loss of the multimask point pass (`sam_hf.training.multimask_loss`).

        Every `multimask_every`-th object of each image is point-prompted, starting at an offset that cycles with
        `step`, so that every object takes its turn (1 prompts them all). Rows flagged `point_only` (crops cut for the
        point prompts, `--point_crop_scale`) have all their objects prompted, against their `point_labels`; only the
        rows with an object chosen at this step are decoded.
        """
        every = self.multimask_every
        batch, k = labels.shape[:2]
        turn = torch.zeros(k, dtype=torch.bool, device=labels.device)
        turn[step % every :: every] = True
        chosen, targets = turn.expand(batch, k), labels
        if "point_only" in inputs:
            # `point_labels` holds every row's targets (for point-only rows, `labels` holds -100).
            chosen, targets = chosen | inputs["point_only"][:, None], inputs["point_labels"]
        # Only the rows and objects with a prompt at this step are decoded; what else they hold is masked out.
        rows, objects = chosen.any(dim=1).nonzero().squeeze(1), chosen.any(dim=0).nonzero().squeeze(1)
        if not len(rows):
            # No object of this micro-batch has its turn: decode one prompt whose loss is 0, so that every process
            # still reaches the same parameters (DistributedDataParallel waits for their gradients).
            rows = objects = torch.zeros(1, dtype=torch.long, device=labels.device)
            chosen = torch.zeros_like(chosen)
        chosen = chosen[rows][:, objects]
        targets = targets[rows][:, objects].masked_fill(~chosen[:, :, None, None], LABEL_PAD)
        points, point_labels = inputs["input_points"][rows][:, objects], inputs["input_labels"][rows][:, objects]
        outputs = self._decode_points(model, features, points, point_labels, None if len(rows) == batch else rows)
        mask_sum, iou_sum, _ = multimask_loss(
            self.loss_fn, outputs.pred_masks, outputs.iou_scores, targets, reduction="sum"
        )
        return mask_sum, iou_sum

    def background_loss(self, model, inputs, features) -> torch.Tensor:
        """Summed over the images with background: each image's point on no object (`background_points`) decoded
        with `multimask_output=True`, and the mean over the three candidates of the cross-entropy of their logits
        against an empty mask plus `iou_loss_weight` times their squared predicted IoU (the target being 0: the
        point selects no object)."""
        outputs = self._decode_points(model, features, inputs["background_points"], inputs["background_labels"])
        logits, scores = outputs.pred_masks[:, 0].float(), outputs.iou_scores[:, 0].float()  # (B, 3, m, m), (B, 3)
        empty = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none").mean((-2, -1))
        per_image = (empty + self.iou_loss_weight * scores**2).mean(dim=1)
        return (per_image * (inputs["background_labels"][:, 0, 0] == 1)).sum()

    def correction_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        features: tuple[torch.Tensor, ...],
        logits: torch.Tensor,
        labels: torch.Tensor,
        kind: str,
        rounds: int,
        seed: int,
    ) -> torch.Tensor:
        """The summed loss of `rounds` correction rounds (`sam_hf.core.clicks`), the clicks drawn by a generator
        seeded with `seed`.

        Each round adds one click per object, drawn from its larger error region, to the prompts so far and feeds the
        previous round's low-resolution logits (detached) back as the mask prompt. SAM's prompt encoder takes one mask
        per image, so each object is decoded as its own image: the features are repeated per object.
        """
        b, k, m = labels.shape[0], labels.shape[1], labels.shape[-1]
        image = self.family.decoder_inputs(tuple(f.repeat_interleave(k, dim=0) for f in features))
        prompts: dict[str, torch.Tensor] = {}
        if "box" in kind:
            prompts["input_boxes"] = inputs["input_boxes"].reshape(b * k, 1, 4)
        points = inputs["input_points"].reshape(b * k, 1, -1, 2) if "point" in kind else None
        point_labels = inputs["input_labels"].reshape(b * k, 1, -1) if "point" in kind else None
        flat_labels = labels.reshape(b * k, m, m)
        previous = logits.detach().reshape(b * k, m, m)
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(seed)
        total = logits.sum() * 0.0
        for _ in range(rounds):
            click, positive = correction_clicks(previous, flat_labels, self.geometry.image_size, generator)
            click, positive = click[:, None, None].to(logits.dtype), positive[:, None, None]
            points = click if points is None else torch.cat([points, click], dim=2)
            point_labels = positive if point_labels is None else torch.cat([point_labels, positive], dim=2)
            out = model(
                **image,
                **prompts,
                input_points=points,
                input_labels=point_labels,
                input_masks=previous[:, None],
                multimask_output=False,
                **self.family.forward_kwargs,
            )
            round_logits = out.pred_masks[:, 0, 0].reshape(b, k, m, m)
            loss, _ = self.mask_loss(round_logits, out.iou_scores[:, 0, 0].reshape(b, k), labels)
            total = total + loss
            previous = round_logits.detach().reshape(b * k, m, m)
        return total

"""`SamTrainer`: a `transformers.Trainer` that computes DiceCE for box-prompted SAM and evaluates per object."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..config.arguments import parse_prompt_types
from ..core.clicks import correction_clicks
from ..core.scores import object_stats
from ..data.transforms import LABEL_PAD
from ..family.lora import is_lora_model, save_lora_model
from ..family.registry import as_levels, family_of
from ..hub.card import render_model_card
from .callbacks import FiniteGradientCallback, PromptEpochCallback
from .loss import SamDiceCELoss, iou_prediction_loss, multimask_loss

logger = logging.getLogger(__name__)


class SamTrainer(Trainer):
    """Trainer for SAM mask decoders prompted with boxes.

    `SamModel` returns no loss and ignores unknown keyword arguments, so this trainer passes the model only the inputs
    it uses, always with `multimask_output=False`, and computes the loss itself with `SamDiceCELoss`. For the same
    reason it sets `remove_unused_columns=False` and `label_names=["labels"]` on its arguments.

    Gradient accumulation: the loss of one micro-batch is the *sum* of its per-object losses divided by the number of
    real objects in the whole accumulation window (and across processes), which the Trainer provides as
    `num_items_in_batch` (it counts label pixels that are not -100; every object has `m * m` of them). Batch 2 with
    accumulation 1 therefore gives the same update as batch 1 with accumulation 2, and `loss_is_scaled_for_ga` is set.

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

    Hub token: a `--hub_token` is moved to the `HF_TOKEN` environment variable of this process before the Trainer
    starts, so that it is never pickled into `training_args.bin` (which `push_to_hub` uploads).

    Evaluation: `prediction_step` returns, per object, the intersection, predicted area and ground-truth area at the
    original image resolution (as predictions, `(B, K, 2)`) and the ground-truth area (as labels, `(B, K)`), which
    `sam_hf.training.compute_metrics` turns into `eval_dice` and `eval_iou`.

    Args:
        loss_fn (`SamDiceCELoss`, *optional*): the loss; defaults to equal Dice and CE weights.
        eval_chunk_size (`int`, *optional*, defaults to 64): objects upsampled to full resolution at
            once in evaluation.
        lora_merge (`bool`, *optional*, defaults to True): for a peft model (`--lora_rank`), the final save writes
            the adapter to `<output_dir>/adapter` and, when True, the merged plain checkpoint to `<output_dir>`
            (`sam_hf.family.save_lora_model`); checkpoints during training hold the adapter, as Trainer resumes them.
        card_info (`dict`, *optional*): extra facts for the model card (see `sam_hf.hub.render_model_card`).
        iou_loss_weight (`float`, *optional*, defaults to 1.0): weight of the IoU-prediction losses, of the
            box-prompted mask and, when batches carry point prompts (`SamTransform(point_prompts=True)`,
            the default of `train.py`), of the three multimask candidates. With 0 and no point prompts, freeze the IoU
            head (`freeze_unused_decoder_outputs(model, train_iou_head=False)`).
        multimask_every (`int`, *optional*, defaults to 1): with point prompts, point-prompt every this many objects
            of each image in the multimask pass (1: all of them, `--multimask_training`).
        background_point_weight (`float`, *optional*, defaults to 0.1): weight of the background-point loss, when
            batches carry background points; 0 skips that decoder call.
        **kwargs: all other arguments are those of `transformers.Trainer`.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        loss_fn: SamDiceCELoss | None = None,
        eval_chunk_size: int = 64,
        card_info: dict | None = None,
        iou_loss_weight: float = 1.0,
        multimask_every: int = 1,
        background_point_weight: float = 0.1,
        lora_merge: bool = True,
        prompt_types: tuple[str, ...] = ("box",),
        num_correction_rounds: int = 0,
        **kwargs: Any,
    ):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.hub_token:
            # Trainer pickles its TrainingArguments into every checkpoint (training_args.bin), and push_to_hub uploads
            # it: a --hub_token kept there would be published. huggingface_hub reads HF_TOKEN instead.
            os.environ["HF_TOKEN"] = training_args.hub_token
            training_args.hub_token = None
            logger.info("--hub_token moved to the HF_TOKEN environment variable; it is not saved with the model.")
        super().__init__(*args, **kwargs)
        # SamModel.forward takes **kwargs, so the Trainer would keep no extra column and find no label names: the
        # transform's columns must reach the collator and the labels are always `labels`.
        if self.args.remove_unused_columns or self.args.label_names != ["labels"]:
            logger.info("SamTrainer sets remove_unused_columns=False and label_names=['labels'].")
        self.args.remove_unused_columns = False
        self.args.label_names = self.label_names = ["labels"]
        self.loss_fn = loss_fn if loss_fn is not None else SamDiceCELoss()
        self.eval_chunk_size = eval_chunk_size
        self.card_info = card_info or {}
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
        self.lora_merge = lora_merge
        # What differs between SAM, SAM-HQ and SAM 2-style models (image features, decoder call, mask geometry).
        self.family = family_of(self.accelerator.unwrap_model(self.model))
        self.geometry = self.family.geometry(self.accelerator.unwrap_model(self.model).config)
        # The loss below is normalised by `num_items_in_batch`; this makes the Trainer count it.
        self.model_accepts_loss_kwargs = True
        self.add_callback(FiniteGradientCallback())
        epoch_callback = PromptEpochCallback.for_dataset(self.train_dataset)
        if epoch_callback.transform is not None:
            self.add_callback(epoch_callback)

    def _image_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The model's image-side keyword arguments: `pixel_values`, or the cached features in the family's form."""
        if "image_embeddings" in inputs:
            return self.family.decoder_inputs(as_levels(inputs["image_embeddings"]))
        return {"pixel_values": inputs["pixel_values"]}

    def _forward(self, model: torch.nn.Module, inputs: dict[str, Any], kind: str = "box", **kwargs: Any):
        """The first prompted call (`kind`: box, point or box+point): the model gets only the inputs it uses (its
        forward ignores unknown keys)."""
        prompts = {}
        if "box" in kind:
            prompts["input_boxes"] = inputs["input_boxes"]
        if "point" in kind:
            prompts["input_points"], prompts["input_labels"] = inputs["input_points"], inputs["input_labels"]
        return model(**self._image_inputs(inputs), **prompts, **self.family.forward_kwargs, **kwargs)

    def prompt_kind(self, training: bool) -> str:
        """The prompt type of this training step: `prompt_types` in turn, one per step; evaluation uses boxes."""
        return self.prompt_types[self.state.global_step % len(self.prompt_types)] if training else "box"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        multimask = bool(self.multimask_every) and "input_points" in inputs and model.training
        rounds = self.num_correction_rounds if model.training else 0
        kind = self.prompt_kind(model.training)
        reused, hook = None, None  # reused: image features the later decoder calls get instead of pixel_values
        if (multimask or rounds) and "pixel_values" in inputs:
            unwrapped = self.accelerator.unwrap_model(model)
            vision = self.family.vision_encoder(unwrapped)
            if not any(p.requires_grad for p in vision.parameters()):
                # Several decoder calls follow; run the frozen encoder once for all (no gradient flows through it).
                with torch.no_grad():
                    features = self.family.encode(unwrapped, inputs["pixel_values"])
                inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
                inputs["image_embeddings"] = list(features) if len(features) > 1 else features[0]
            else:
                # A learning encoder (LoRA, unfrozen): keep the features of the first call, through the (possibly
                # distributed) model, and give them to the later ones, so the encoder runs once and every loss
                # reaches it.
                captured: list[Any] = []
                hook = vision.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            outputs = self._forward(model, inputs, kind, multimask_output=False)
        finally:
            if hook is not None:
                hook.remove()
        if hook is not None:
            reused = self.family.capture(captured[-1], outputs)
        elif "image_embeddings" in inputs:
            reused = as_levels(inputs["image_embeddings"])
        logits = outputs.pred_masks[:, :, 0]
        loss, n_objects = self.loss_fn(logits, labels)
        if self.iou_loss_weight:
            # With multimask_output=False the decoder returns the IoU head's prediction for mask token 0, the mask it
            # outputs: teach it that mask's actual IoU, so that `iou_scores` rank masks by quality.
            loss = loss + self.iou_loss_weight * iou_prediction_loss(logits, outputs.iou_scores[:, :, 0], labels)
        if multimask:
            mask_sum, iou_sum = self.point_pass_loss(model, inputs, reused, labels)
            # A sum over the chosen objects per box-prompted object: the scaling below turns it into a sum over the
            # chosen objects divided by the objects of the whole accumulation window, which gradient accumulation
            # does not change. With every object chosen, it is the mean best-of-3 and IoU loss.
            loss = loss + (mask_sum + self.iou_loss_weight * iou_sum) / max(n_objects, 1)
            if self.background_point_weight and "background_points" in inputs:
                background = self.background_loss(model, inputs, reused)
                loss = loss + self.background_point_weight * background / max(n_objects, 1)
        if rounds:
            loss = loss + self.correction_loss(model, inputs, reused, logits, labels, kind, rounds)
        if model.training and not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite training loss ({loss.item()}) at step {self.state.global_step}: stopping before a NaN "
                "model is saved. Check the learning rate, the precision (--fp16 overflows more easily than --bf16) "
                "and the inputs."
            )
        if num_items_in_batch is not None:
            pixels_per_object = labels.shape[-1] * labels.shape[-2]
            # The terms above are sums divided by max(n_objects, 1): with no box-prompted object in this micro-batch
            # (rows for the point pass only) the box term is 0 and the others still count.
            loss = loss * (max(n_objects, 1) * pixels_per_object) / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _decode_points(self, model, reused, points: torch.Tensor, point_labels: torch.Tensor, rows=None):
        """A multimask decoder call with the given point prompts on this batch's image features (`reused`), or on
        those of its `rows` only (a 1-D index tensor; the prompts given are then already those rows')."""
        features = reused if rows is None else tuple(f[rows] for f in reused)
        return model(
            **self.family.decoder_inputs(features),
            input_points=points,
            input_labels=point_labels,
            multimask_output=True,
            **self.family.forward_kwargs,
        )

    def point_pass_loss(self, model, inputs, reused, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed best-of-3 mask loss and IoU loss of the multimask point pass (`sam_hf.training.multimask_loss`).

        Every `multimask_every`-th object of each image is point-prompted, starting at an offset that cycles with the
        step, so that every object takes its turn (1 prompts them all). Rows flagged `point_only` (crops cut for the
        point prompts, `--point_crop_scale`) have all their objects prompted, against their `point_labels`; only the
        rows with an object chosen at this step are decoded.
        """
        every = self.multimask_every
        batch, k = labels.shape[:2]
        turn = torch.zeros(k, dtype=torch.bool, device=labels.device)
        turn[self.state.global_step % every :: every] = True
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
        outputs = self._decode_points(model, reused, points, point_labels, None if len(rows) == batch else rows)
        mask_sum, iou_sum, _ = multimask_loss(
            self.loss_fn, outputs.pred_masks, outputs.iou_scores, targets, reduction="sum"
        )
        return mask_sum, iou_sum

    def background_loss(self, model, inputs, reused) -> torch.Tensor:
        """Summed over the images with background: each image's point on no object (`background_points`) decoded
        with `multimask_output=True`, and the mean over the three candidates of the cross-entropy of their logits
        against an empty mask plus `iou_loss_weight` times their squared predicted IoU (the target being 0: the
        point selects no object)."""
        outputs = self._decode_points(model, reused, inputs["background_points"], inputs["background_labels"])
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
    ) -> torch.Tensor:
        """The summed loss of `rounds` correction rounds (`sam_hf.core.clicks`).

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
        generator.manual_seed(hash((self.args.seed, self.state.global_step, self.args.process_index)) % 2**63)
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
            loss, _ = self.loss_fn(round_logits, labels)
            if self.iou_loss_weight:
                loss = loss + self.iou_loss_weight * iou_prediction_loss(
                    round_logits, out.iou_scores[:, 0, 0].reshape(b, k), labels
                )
            total = total + loss
            previous = round_logits.detach().reshape(b * k, m, m)
        return total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        if "instances" not in inputs:
            raise ValueError(
                "Evaluation batches need `instances` and `object_ids` (SamTransform(with_instances=True))."
            )
        stats = self.object_stats(outputs.pred_masks[:, :, 0], inputs)
        return loss, stats[..., :2], stats[..., 2]

    def object_stats(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`(B, K, 3)` intersection / predicted / ground-truth areas at original resolution; padding rows are -100."""
        b, k = logits.shape[:2]
        stats = torch.full((b, k, 3), -100.0, dtype=torch.float64, device=logits.device)
        for i in range(b):
            h, w = (int(v) for v in inputs["original_sizes"][i])
            ids = inputs["object_ids"][i]
            instances = inputs["instances"][i, :h, :w]
            n_objects = int((ids > 0).sum())
            for start in range(0, n_objects, self.eval_chunk_size):
                # Stop at the last real object: the collator pads with id 0, which must not be scored.
                sl = slice(start, min(start + self.eval_chunk_size, n_objects))
                pred = self.geometry.upscale(logits[i, sl], (h, w), inputs["reshaped_input_sizes"][i].tolist()) > 0
                target = instances[None] == ids[sl, None, None]
                stats[i, sl] = object_stats(pred, target)
        return stats

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write the sam_hf model card (rendered from `model_card.md`) instead of the generic Trainer card."""
        if not self.is_world_process_zero():
            return

        card = render_model_card(self, **{**self.card_info, **kwargs})
        card.save(f"{self.args.output_dir}/README.md")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The final save of a LoRA run writes the adapter to `adapter/` and the merged checkpoint beside it."""

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not is_lora_model(model) or os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_lora_model(model, output_dir, merge=self.lora_merge)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

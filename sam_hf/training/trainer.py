"""`SamTrainer`: a `transformers.Trainer` that computes DiceCE for box-prompted SAM and evaluates per object."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.masks import boxes_from_instances
from ..core.scores import object_stats
from ..data.transforms import LABEL_PAD, object_labels
from ..family.lora import is_lora_model, save_lora_model
from ..family.registry import as_levels, family_of
from ..hub.card import render_model_card
from .callbacks import FiniteGradientCallback, PromptEpochCallback
from .loss import SamDiceCELoss
from .objective import SamObjective
from .output_dir import disk_full_error, failed_checkpoint, is_disk_full

logger = logging.getLogger(__name__)


class SamTrainer(Trainer):
    """Trainer for SAM mask decoders prompted with boxes.

    `SamModel` returns no loss and ignores unknown keyword arguments, so this trainer passes the model only the inputs
    it uses, and computes the loss itself with a `SamObjective` (`self.objective`: the box pass, the multimask point
    pass, the background-point loss and the correction rounds, see `sam_hf.training.objective`). For the same reason
    it sets `remove_unused_columns=False` and `label_names=["labels"]` on its arguments.

    Gradient accumulation: the loss of one micro-batch is the *sum* of its per-object losses divided by the number of
    real objects in the whole accumulation window (and across processes), which the Trainer provides as
    `num_items_in_batch` (it counts label pixels that are not -100; every object has `m * m` of them). Batch 2 with
    accumulation 1 therefore gives the same update as batch 1 with accumulation 2, and `loss_is_scaled_for_ga` is set.

    Hub token: a `--hub_token` is moved to the `HF_TOKEN` environment variable of this process before the Trainer
    starts, so that it is never pickled into `training_args.bin` (which `push_to_hub` uploads).

    Evaluation: `prediction_step` returns, per object, the intersection, predicted area and ground-truth area at the
    original image resolution (as predictions, `(B, K, 2)`) and the ground-truth area (as labels, `(B, K)`), which
    `sam_hf.training.compute_metrics` turns into `eval_dice` and `eval_iou`. Memory does not grow with the objects of
    an image: the image side runs once per batch and the objects are decoded, labelled and scored `eval_chunk_size`
    at a time (see `prediction_step`), as `scripts/evaluate.py` does.

    Args:
        loss_fn (`SamDiceCELoss`, *optional*): the loss; defaults to equal Dice and CE weights.
        eval_chunk_size (`int`, *optional*, defaults to 64): objects per image decoded, labelled and upsampled to
            full resolution at once in evaluation; at most `per_device_eval_batch_size` x `eval_chunk_size` objects'
            masks exist at a time.
        lora_merge (`bool`, *optional*, defaults to True): for a peft model (`--lora_rank`), the final save writes
            the adapter to `<output_dir>/adapter` and, when True, the merged plain checkpoint to `<output_dir>`
            (`sam_hf.family.save_lora_model`); checkpoints during training hold the adapter, as Trainer resumes them.
        card_info (`dict`, *optional*): extra facts for the model card (see `sam_hf.hub.render_model_card`).
        iou_loss_weight (`float`, *optional*, defaults to 1.0): weight of the IoU-prediction losses.
        multimask_every (`int`, *optional*, defaults to 1): with point prompts, point-prompt every this many objects
            of each image in the multimask pass (1: all of them, `--multimask_training`).
        background_point_weight (`float`, *optional*, defaults to 0.1): weight of the background-point loss.
        prompt_types (`tuple[str, ...]`, *optional*, defaults to `("box",)`): prompt types of the first pass, one
            per training step in turn.
        num_correction_rounds (`int`, *optional*, defaults to 0): correction rounds per training step.
        **kwargs: all other arguments are those of `transformers.Trainer`.

    `loss_fn`, `iou_loss_weight`, `multimask_every`, `background_point_weight`, `prompt_types` and
    `num_correction_rounds` build `self.objective` (`SamObjective`, which documents them).
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
        if eval_chunk_size < 1:
            raise ValueError(f"eval_chunk_size must be >= 1, got {eval_chunk_size}.")
        self.eval_chunk_size = eval_chunk_size
        self.card_info = card_info or {}
        self.lora_merge = lora_merge
        # What differs between SAM, SAM-HQ and SAM 2-style models (image features, decoder call, mask geometry).
        self.family = family_of(self.accelerator.unwrap_model(self.model))
        self.geometry = self.family.geometry(self.accelerator.unwrap_model(self.model).config)
        self.objective = SamObjective(
            self.family,
            self.geometry,
            loss_fn=loss_fn,
            iou_loss_weight=iou_loss_weight,
            multimask_every=multimask_every,
            background_point_weight=background_point_weight,
            prompt_types=prompt_types,
            num_correction_rounds=num_correction_rounds,
        )
        # The loss below is normalised by `num_items_in_batch`; this makes the Trainer count it.
        self.model_accepts_loss_kwargs = True
        self.add_callback(FiniteGradientCallback())
        epoch_callback = PromptEpochCallback.for_dataset(self.train_dataset)
        if epoch_callback.transform is not None:
            self.add_callback(epoch_callback)

    @property
    def iou_loss_weight(self) -> float:
        """The objective's IoU-prediction loss weight (the model card reads it)."""
        return self.objective.iou_loss_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`self.objective`'s loss of this batch, stopped if it is not finite and scaled for gradient accumulation."""
        loss, n_objects, outputs = self.objective(
            model,
            inputs,
            self.state.global_step,
            seed=self.args.seed,
            process_index=self.args.process_index,
            unwrap_model=self.accelerator.unwrap_model,
        )
        if model.training and not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite training loss ({loss.item()}) at step {self.state.global_step}: stopping before a NaN "
                "model is saved. Check the learning rate, the precision (--fp16 overflows more easily than --bf16) "
                "and the inputs."
            )
        if num_items_in_batch is not None:
            pixels_per_object = inputs["labels"].shape[-1] * inputs["labels"].shape[-2]
            # The objective's terms are sums divided by max(n_objects, 1): with no box-prompted object in this
            # micro-batch (rows for the point pass only) the box term is 0 and the others still count.
            loss = loss * (max(n_objects, 1) * pixels_per_object) / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss and per-object statistics of one evaluation batch, decoded `eval_chunk_size` objects at a time.

        The image side runs once per batch. Then each chunk of object slots is decoded for the rows that have a real
        object there, its low-resolution labels are made from the instance map (`sam_hf.data.object_labels`; a batch
        that carries `labels` is sliced instead), its masks are upscaled to the original resolution and scored, and
        all of it is freed before the next chunk. The loss is the mean over the real objects of the batch, as one
        decoder call over all of them gives it.
        """
        inputs = self._prepare_inputs(inputs)
        if "instances" not in inputs and ("labels" not in inputs or not prediction_loss_only):
            raise ValueError(
                "Evaluation batches need `instances` and `object_ids` (SamTransform(with_instances=True))."
            )
        features = self._eval_image_features(model, inputs)
        batch, k = inputs["input_boxes"].shape[:2]
        device = inputs["input_boxes"].device
        stats = torch.full((batch, k, 3), -100.0, dtype=torch.float64, device=device)
        maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per row: the instance map and its objects' boxes
        loss_sum, n_sum = torch.zeros((), dtype=torch.float64, device=device), 0
        for start in range(0, k, self.eval_chunk_size):
            sl = slice(start, min(start + self.eval_chunk_size, k))
            labels = inputs["labels"][:, sl] if "labels" in inputs else self._chunk_labels(inputs, sl, maps)
            real = labels[:, :, 0, 0] != LABEL_PAD
            rows = real.any(dim=1).nonzero().squeeze(1)
            if not len(rows):
                continue  # padding only
            chunk = {
                "image_embeddings": [f[rows] for f in features] if len(features) > 1 else features[0][rows],
                "input_boxes": inputs["input_boxes"][rows, sl],
                "labels": labels[rows],
            }
            with torch.no_grad():
                loss, outputs = self.compute_loss(model, chunk, return_outputs=True)
            # The mean over the chunk's real objects: weighted by their number, the chunks add up to the batch mean.
            n = int(real.sum())
            loss_sum += loss.detach().double() * n
            n_sum += n
            if not prediction_loss_only:
                logits = outputs.pred_masks[:, :, 0]
                for j, i in enumerate(rows.tolist()):
                    stats[i, sl] = self._chunk_stats(logits[j], inputs, i, sl)
            del chunk, labels, outputs, loss
        loss = (loss_sum / max(n_sum, 1)).float()
        if prediction_loss_only:
            return loss, None, None
        return loss, stats[..., :2], stats[..., 2]

    def _eval_image_features(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The batch's image features, computed once for all its chunks of objects: the cached embeddings, or the
        image side's output (under the run's mixed precision, as the model's forward would run it)."""
        if "image_embeddings" in inputs:
            return as_levels(inputs["image_embeddings"])
        with torch.no_grad(), self.accelerator.autocast():
            return as_levels(self.family.encode(self.accelerator.unwrap_model(model), inputs["pixel_values"]))

    def _chunk_labels(
        self, inputs: dict[str, torch.Tensor], sl: slice, maps: dict[int, tuple[np.ndarray, np.ndarray]]
    ) -> torch.Tensor:
        """`(B, len(sl), m, m)` soft labels of the object slots `sl` of every row, made from the row's instance map
        as `SamTransform` makes them (`object_labels` on each object's exact box); padded slots are -100.

        `maps` keeps each row's instance map and boxes (`boxes_from_instances`, one pass over the map) for the next
        chunks.
        """
        ids = inputs["object_ids"][:, sl].cpu().numpy()
        side = self.geometry.mask_side
        labels = torch.full((len(ids), len(ids[0]), side, side), LABEL_PAD)
        for i, row_ids in enumerate(ids):
            real = row_ids[row_ids > 0]  # the collator pads each row's objects at its end with id 0
            if not len(real):
                continue
            if i not in maps:
                h, w = (int(v) for v in inputs["original_sizes"][i])
                instances = inputs["instances"][i, :h, :w].cpu().numpy()
                maps[i] = instances, boxes_from_instances(instances)
            instances, boxes = maps[i]
            label_shape = self.geometry.label_shape(*instances.shape)
            labels[i, : len(real)] = object_labels(instances, boxes[real - 1], real, label_shape, side)
        return labels.to(inputs["input_boxes"].device)

    def _chunk_stats(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], i: int, sl: slice) -> torch.Tensor:
        """`(len(sl), 3)` intersection / predicted / ground-truth areas at original resolution of the object slots
        `sl` of row `i`, from their low-resolution `logits`; padded slots are -100."""
        h, w = (int(v) for v in inputs["original_sizes"][i])
        ids = inputs["object_ids"][i, sl]
        n = int((ids > 0).sum())  # stop at the last real object: padding (id 0) must not be scored
        stats = torch.full((len(ids), 3), -100.0, dtype=torch.float64, device=logits.device)
        if n:
            pred = self.geometry.upscale(logits[:n], (h, w), inputs["reshaped_input_sizes"][i].tolist()) > 0
            target = inputs["instances"][i, :h, :w][None] == ids[:n, None, None]
            stats[:n] = object_stats(pred, target)
        return stats

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write the sam_hf model card (rendered from `model_card.md`) instead of the generic Trainer card."""
        if not self.is_world_process_zero():
            return

        card = render_model_card(self, **{**self.card_info, **kwargs})
        card.save(f"{self.args.output_dir}/README.md")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The final save of a LoRA run writes the adapter to `adapter/` and the merged checkpoint beside it. A full
        disk is reported with the directory, the free space and the checkpoint to resume from (`disk_full_error`).

        Overridden (a private method) because every path of `save_model` (one process, DDP, FSDP, DeepSpeed) ends
        here, and no public hook decides what is written.
        """

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        try:
            if not is_lora_model(model) or os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
                return super()._save(output_dir, state_dict)
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            save_lora_model(model, output_dir, merge=self.lora_merge)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        except Exception as err:
            if not is_disk_full(err):
                raise
            raise disk_full_error("the model", output_dir, self.args.output_dir) from err

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Trainer's checkpoint save; when it fails, the incomplete `checkpoint-N` folder is removed (with a log line)
        so that nothing recommends resuming from it, and a full disk says where and how much space is left.

        Overridden (a private method) because Trainer has no public hook around a checkpoint's save: `on_save` runs
        only after it succeeded.
        """
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            clearer = failed_checkpoint(folder, err, remove=self.args.should_save)
            if clearer is None:
                raise
            raise clearer from err

"""The end-of-run report: recipe and loss descriptions, figures, and the summary."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

import datasets
import numpy as np

from ..config.arguments import DataArguments, SamArguments, multimask_stride, parse_prompt_types
from ..evaluation.boxes import evaluate_models
from ..inference.predictor import SamPredictor
from .trainer import SamTrainer

logger = logging.getLogger(__name__)


# The end-of-run summary has its own logger, so that it shows at transformers' default (warning) verbosity.
SUMMARY_LOGGER = logging.getLogger(f"{__name__}.summary")


def box_baseline_dice(dataset: datasets.Dataset) -> float:
    """Mean per-object Dice of predicting each object's exact box, filled: the score a model must beat.

    Reads the `boxes` and `areas` columns of `index_objects`; an object lies inside its box, so the intersection is
    its area and Dice is `2 * area / (area + box_area)`.
    """
    boxes = np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in dataset["boxes"]])
    areas = np.concatenate([np.asarray(a, np.float64) for a in dataset["areas"]])
    box_areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return float(np.mean(2 * areas / (areas + box_areas)))


def prompt_recipe(data_args: DataArguments, sam_args: SamArguments) -> str:
    """How the model was prompted and what it saw, in words, for the model card."""
    jitter = sam_args.box_jitter
    boxes = f"jittered outward by up to {jitter:g} px per side" if jitter else "exact"
    text = (
        f"one box per object from the ground-truth masks (mask_type={data_args.mask_type}); training boxes {boxes}, "
        f"at most {sam_args.max_objects_per_image} objects per image per step; evaluation boxes exact."
    )
    if data_args.object_crop_scale:
        text += (
            f" Each object was seen on its own square crop, {data_args.object_crop_scale:g} times the longer side of "
            f"its box: predict the same way (`scripts/predict.py --object_crop_scale {data_args.object_crop_scale:g}`,"
            " `sam_hf.inference.ObjectCropPredictor`)."
        )
        if data_args.point_crop_scale:
            text += (
                f" One object in {data_args.point_crop_every} was also cut on a crop of "
                f"{data_args.point_crop_scale:g} times its box, for the point prompts only."
            )
    elif data_args.tile_size:
        text += f" Images were cut into {data_args.tile_size}-px tiles (overlap {data_args.tile_overlap} px)."
    return text + interactive_recipe(sam_args)


def loss_description(sam_args: SamArguments) -> str:
    """What the training loss is, in words, for the model card."""
    text = (
        f"MONAI DiceCELoss(sigmoid=True), lambda_dice={sam_args.lambda_dice}, lambda_ce={sam_args.lambda_ce}, on the "
        "low-resolution mask logits of the box prompts with multimask_output=False"
    )
    if sam_args.iou_loss_weight > 0:
        text += (
            f", plus an IoU-prediction MSE (weight {sam_args.iou_loss_weight:g}) between the IoU head's score for "
            "that mask and its actual IoU with the target"
        )
    every = multimask_stride(sam_args)
    if every:
        which = "per object" if every == 1 else f"for every {every}th object of each image (in turn)"
        text += (
            f"; plus, {which}, prompted with one random interior point and multimask_output=True, the best-of-3 "
            f"DiceCE and an IoU-prediction MSE (weight {sam_args.iou_loss_weight:g}) over the three candidates"
            + ("" if every == 1 else ", summed over those objects and divided by the number of box-prompted objects")
        )
        if sam_args.background_point_weight:
            text += (
                f"; plus (weight {sam_args.background_point_weight:g}) one point per image on no object, its three "
                "masks against an empty target (cross-entropy) and their predicted IoUs against 0"
            )
    return text + "."


def interactive_recipe(sam_args: SamArguments) -> str:
    """The model card's words for `--prompt_types` and `--num_correction_rounds` (empty for the default)."""
    types = parse_prompt_types(sam_args.prompt_types)
    text = ""
    if types != ("box",):
        text += f" First prompts taken in turn per step: {', '.join(types)} (points drawn inside each object)."
    if sam_args.num_correction_rounds:
        text += (
            f" Interactive training: {sam_args.num_correction_rounds} correction round(s), each adding one click "
            "from the larger error region and the previous logits as mask prompt; losses summed over rounds."
        )
    return text


def write_figures(
    trainer: SamTrainer, processor, eval_images: datasets.Dataset | None, mask_type: str = "auto"
) -> list[Path]:
    """Write `loss_curves.png` and `eval_predictions.png` (tuned model against ground truth on up to 4 eval images)
    to the output dir; skipped with a warning when matplotlib (`sam_hf[viz]`) is missing."""
    try:
        from ..viz.plots import has_loss_curves, plot_base_vs_tuned, plot_loss_curves, save_figure
    except ImportError as err:
        logger.warning("No figures written: %s (install sam_hf[viz]).", err)
        return []
    pass  # __HOISTED__

    out = Path(trainer.args.output_dir)
    written = []
    if has_loss_curves(out):
        written.append(save_figure(plot_loss_curves(out), out / "loss_curves.png"))
    else:
        logger.info(
            "loss_curves.png not written: the run logged no loss and no evaluation (max_steps %s, logging_steps %s).",
            trainer.args.max_steps,
            trainer.args.logging_steps,
        )
    if eval_images is not None and len(eval_images):
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        predictor = SamPredictor(model, processor)
        result = evaluate_models(
            {"tuned": predictor},
            eval_images,
            mask_type,
            num_figure_images=len(eval_images),
            # The frozen encoder's cached output, when there is one: no image is encoded again.
            use_cached_embeddings="image_embeddings" in eval_images.column_names,
        )
        written.append(save_figure(plot_base_vs_tuned(result["figure_samples"]), out / "eval_predictions.png"))
        model.train(was_training)
    if written:
        logger.info("Wrote %s", ", ".join(p.name for p in written))
    return written


# DataArguments that do not change which images are evaluated, left out of the suggested evaluate.py command.
_NOT_FOR_EVALUATION = {"max_train_samples", "preprocessing_num_workers", "point_crop_scale", "point_crop_every"}


def evaluate_command(model_name_or_path: str, output_dir: str, data_args: DataArguments, seed: int) -> str:
    """The `scripts/evaluate.py` command that scores the base and the tuned model on the run's held-out images: the
    run's data flags that differ from their defaults, and `--seed` if it is not 42."""
    python = os.path.relpath(sys.executable) if sys.executable else "python"
    if python.startswith(".."):
        python = "python"
    argv = [python, "scripts/evaluate.py", "--model", f"base={model_name_or_path}", f"tuned={output_dir}"]
    for f in fields(DataArguments):
        value = getattr(data_args, f.name)
        if f.name in _NOT_FOR_EVALUATION or value is None or value == f.default:
            continue
        argv += [f"--{f.name}", f"{value:g}" if isinstance(value, float) else str(value)]
    if seed != 42:
        argv += ["--seed", str(seed)]
    argv += ["--output_dir", f"{os.path.normpath(output_dir)}-eval"]
    return shlex.join(argv)


def training_summary(
    metrics: dict[str, float],
    output_dir: str,
    figures: list[Path] | tuple[Path, ...] = (),
    best_step: int | None = None,
    eval_images: int | None = None,
    next_command: str | None = None,
    hub_model_id: str | None = None,
    eval_unit: str = "images",
) -> str:
    """The few lines a run ends with: held-out Dice and IoU before -> after, the filled-box baseline, where the
    model, card and figures are, and the next command to run. `eval_unit` names what the `eval_images` rows are
    (`DataArguments.eval_unit`: images, tiles or object crops)."""
    lines = ["Training finished."]
    after = {k: metrics.get(f"eval_{k}") for k in ("dice", "iou")}
    if after["dice"] is not None:
        objects = metrics.get("eval_num_objects", metrics.get("base_eval_num_objects"))
        count = "" if eval_images is None else f"{eval_images} "
        if eval_unit == "object crops":
            where = f" on the {count}held-out objects, each on its own crop"
        else:
            where = f" on the {count}held-out {eval_unit}"
            where += f" ({objects:g} objects)" if objects is not None else ""
        best = f" (best checkpoint, step {best_step})" if best_step is not None else ""
        lines.append(f"Per-object scores{where}, exact box prompts{best}:")
        for key, name in (("dice", "Dice"), ("iou", "IoU")):
            before = metrics.get(f"base_eval_{key}")
            if after[key] is None:
                continue
            if before is None:
                lines.append(f"  {name:<4} {after[key]:.3f}")
            else:
                change = after[key] - before
                lines.append(f"  {name:<4} {before:.3f} -> {after[key]:.3f} ({change:+.3f})")
        baseline = metrics.get("base_eval_box_baseline_dice")
        if baseline is not None:
            lines.append(f'  "fill the box" baseline Dice {baseline:.3f}')
    out = os.path.normpath(output_dir)
    lines.append(f"Model and model card: {out}/ (README.md)" + (f", pushed to {hub_model_id}" if hub_model_id else ""))
    if figures:
        lines.append("Figures: " + ", ".join(os.path.join(out, Path(f).name) for f in figures))
    if next_command:
        lines.append(f"Next, compare the base and tuned models on the same images:\n  {next_command}")
    return "\n".join(lines)

"""Side-by-side evaluation of SAM checkpoints with box prompts: `scripts/evaluate.py` and its library functions.

Per object: Dice and IoU at the original resolution, from the `sam_hf.evaluation.object_metrics` evaluate module.
Reported per model: mean, median and count; per-image means; and a breakdown by object-size tercile (small objects are
where SAM fails). Written as `metrics.json` and `metrics.md`, plus a base-vs-tuned figure when matplotlib is installed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config.arguments import DataArguments
from ..core.env import default_device
from ..core.images import processor_longest_edge
from ..data.indexing import prepare_split
from ..data.sources import load_source, split_source
from ..inference.predictor import SamPredictor
from .arguments import EvaluateArguments, parse_model_specs
from .automatic import evaluate_automatic
from .boxes import evaluate_models
from .interactive import evaluate_interactive
from .report import summarize, to_markdown

logger = logging.getLogger(__name__)


def load_split(data_args: DataArguments, split: str, seed: int, cache_dir: str | None, token: str | None):
    """The indexed split `train.py` would train (`"train"`) or evaluate (`"eval"`) on."""
    return prepare_split(_source_split(data_args, split, seed, cache_dir, token), data_args, split)


def _source_split(data_args: DataArguments, split: str, seed: int, cache_dir: str | None, token: str | None):
    """The split's rows as the source holds them: whole images, before any cut to tiles or crops."""
    source = load_source(
        data_args.dataset_name, data_args.dataset_config_name, data_args.image_column, data_args.mask_column,
        cache_dir, token,
    )  # fmt: skip
    train_ds, eval_ds = split_source(
        source, data_args.train_split, data_args.eval_split, data_args.validation_split_percentage, seed
    )
    ds = eval_ds if split == "eval" else train_ds
    if ds is None:
        raise ValueError(
            f"--dataset_name {data_args.dataset_name!r} has no eval split and --validation_split_percentage is 0."
        )
    return ds


def run_evaluation(eval_args: EvaluateArguments, data_args: DataArguments) -> dict[str, Any]:
    """Evaluate every `--model` on the chosen split; write `metrics.json`, `metrics.md` and `base_vs_tuned.png`."""
    models = parse_model_specs(eval_args.model)
    device = default_device(eval_args.device)
    predictors = {
        name: SamPredictor.from_pretrained(
            path, device=device, chunk_size=eval_args.chunk_size, cache_dir=eval_args.cache_dir, token=eval_args.token
        )
        for name, path in models.items()
    }
    rows = _source_split(data_args, eval_args.split, eval_args.seed, eval_args.cache_dir, eval_args.token)
    # The images train.py would skip as too elongated for a model's input are skipped here too: the same objects.
    edges = [processor_longest_edge(p.processor, labels=True) for p in predictors.values()]
    longest_edge = min((e for e in edges if e is not None), default=None)
    dataset = prepare_split(rows, data_args, eval_args.split, longest_edge)
    result = evaluate_models(
        predictors,
        dataset,
        mask_type=data_args.label_mask_type,
        box_jitter=eval_args.box_jitter,
        jitter_seed=eval_args.jitter_seed,
        num_figure_images=eval_args.num_figure_images,
    )
    summary = summarize(result["objects"], list(models))
    summary.update(
        dataset=data_args.dataset_name,
        split=eval_args.split,
        boxes="exact" if not eval_args.box_jitter else f"jittered outward by up to {eval_args.box_jitter:g} px",
        jitter_seed=eval_args.jitter_seed if eval_args.box_jitter else None,
        model_paths=models,
    )
    if eval_args.automatic:
        whole = dataset
        if data_args.object_crop_scale:
            # An object-crop row labels one object: the pipeline is scored on the whole images, and each generated
            # mask is decoded again on its own crop (refine_on_object_crops), as the boxes above were.
            whole = prepare_split(
                rows, replace(data_args, object_crop_scale=None, point_crop_scale=None), eval_args.split
            )
        summary["automatic"] = evaluate_automatic(
            predictors,
            whole,
            mask_type=data_args.mask_type if data_args.object_crop_scale else data_args.label_mask_type,
            points_per_crop=eval_args.points_per_crop,
            pred_iou_thresh=eval_args.pred_iou_thresh,
            stability_score_thresh=eval_args.stability_score_thresh,
            crops_n_layers=eval_args.crops_n_layers,
            object_crop_scale=data_args.object_crop_scale,
            device=device,
        )
        summary["automatic_settings"] = {
            "points_per_crop": eval_args.points_per_crop,
            "pred_iou_thresh": eval_args.pred_iou_thresh,
            "stability_score_thresh": eval_args.stability_score_thresh,
            "crops_n_layers": eval_args.crops_n_layers,
            "object_crop_scale": data_args.object_crop_scale,
        }
    if eval_args.interactive_clicks:
        summary["interactive"] = evaluate_interactive(
            predictors,
            dataset,
            eval_args.interactive_clicks,
            mask_type=data_args.label_mask_type,
            max_objects_per_image=eval_args.interactive_max_objects,
        )
    out = Path(eval_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "interactive" in summary:
        _save_interactive_figure(summary["interactive"], out / "interactive_curve.png")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "metrics.md").write_text(to_markdown(summary))
    with open(out / "per_object.jsonl", "w") as f:
        for obj in result["objects"]:
            f.write(json.dumps(obj) + "\n")
    if result["figure_samples"]:
        _save_figure(result["figure_samples"], out / ("base_vs_tuned.png" if len(models) > 1 else "predictions.png"))
    logger.info("Wrote %s", ", ".join(str(p) for p in sorted(out.iterdir())))
    return summary


def _save_interactive_figure(interactive: dict[str, Any], path: Path) -> None:
    try:
        from ..viz.plots import plot_interactive_curve, save_figure

        save_figure(plot_interactive_curve(interactive), path)
    except Exception as err:  # an optional figure never fails an evaluation
        logger.warning("Skipping %s: %s: %s", path.name, type(err).__name__, err)


def _save_figure(samples: list[dict[str, Any]], path: Path) -> None:
    try:
        from ..viz.plots import plot_base_vs_tuned, save_figure
    except ImportError as err:
        logger.warning("Skipping %s: %s (install sam_hf[viz] for figures).", path.name, err)
        return
    save_figure(plot_base_vs_tuned(samples), path)

"""Automatic-mask evaluation: pipeline('mask-generation') against the ground truth."""

from __future__ import annotations

import logging
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.images import to_rgb_array
from ..core.masks import mask_to_instances
from ..core.scores import average_precision, match_masks
from ..inference.automatic import mask_generation_pipeline
from ..inference.predictor import SamPredictor
from ..inference.windowed import refine_on_object_crops

logger = logging.getLogger(__name__)


def evaluate_automatic(
    models: dict[str, Any],
    dataset: datasets.Dataset,
    mask_type: str = "auto",
    points_per_crop: int = 16,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    crops_n_layers: int = 0,
    object_crop_scale: float | None = None,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Score `pipeline("mask-generation")` against the ground-truth objects.

    Args:
        models (`dict`): name -> model directory, Hub id or `SamPredictor` (its model and processor are used).
        dataset (`datasets.Dataset`): `image` and `label` columns, whole images.
        points_per_crop (`int`, *optional*, defaults to 16): points per side of the prompt grid.
        pred_iou_thresh (`float`, *optional*, defaults to 0.88): the pipeline's predicted-IoU filter.
        stability_score_thresh (`float`, *optional*, defaults to 0.95): the pipeline's stability filter.
        crops_n_layers (`int`, *optional*, defaults to 0): the pipeline's crop layers (layer k adds 4^k crops).
        object_crop_scale (`float`, *optional*): refine every generated mask on its own object crop of this scale
            (`sam_hf.inference.refine_on_object_crops`), as `sam-hf autolabel` does for a crop-tuned model.

    Returns:
        Per model: `num_masks` (generated, all images), `mean_best_iou` (per ground-truth object, the best IoU of any
        generated mask, 0 if none), `recall@0.5` (objects matched at IoU >= 0.5), `precision@0.5` (generated masks
        matching some object at IoU >= 0.5) and `ap@0.5` (average precision of the masks ranked by their scores,
        matched one to one: whether the scores put good masks first).

    Ground-truth objects are matched through the instance map (see `sam_hf.core.match_masks`), never as
    `(objects, H, W)` masks: besides the pipeline's own output, memory is one mask and a few numbers per object at a
    time.
    """
    out = {}
    for name, model in models.items():
        if not isinstance(model, SamPredictor) and object_crop_scale:
            model = SamPredictor.from_pretrained(str(model), device=device)
        generator = mask_generation_pipeline(model, device=device)
        best, matched, num_masks, all_scores, all_hits = [], 0, 0, [], []
        for idx in tqdm(range(len(dataset)), desc=f"Automatic masks ({name})", unit="image"):
            row = dataset[idx]
            instances = mask_to_instances(row["label"], mask_type)
            image = to_rgb_array(row["image"])
            result = generator(
                Image.fromarray(image),
                points_per_crop=points_per_crop,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                crops_n_layers=crops_n_layers,
            )
            masks, scores = result["masks"], torch.as_tensor(result["scores"]).double().cpu().numpy().reshape(-1)
            if object_crop_scale:
                masks, scores = refine_on_object_crops(model, image, masks, object_crop_scale)
            image_best, image_matched, count, hits = match_masks(masks, instances, int(instances.max()), scores)
            best.extend(image_best.tolist())
            matched += image_matched
            num_masks += count
            all_scores.extend(scores.tolist())
            all_hits.extend(hits.tolist())
        best_arr = np.asarray(best)
        out[name] = {
            "num_masks": num_masks,
            "num_objects": len(best_arr),
            "mean_best_iou": float(best_arr.mean()),
            "recall@0.5": float((best_arr >= 0.5).mean()),
            "precision@0.5": float(matched / num_masks) if num_masks else 0.0,
            "ap@0.5": average_precision(all_scores, all_hits, len(best_arr)),
        }
        logger.info("Automatic masks, %s: %s", name, out[name])
    return out

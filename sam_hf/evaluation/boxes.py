"""Box-prompt evaluation: every object decoded from its box and scored per object."""

from __future__ import annotations

import json
import logging
from typing import Any

import datasets
import evaluate
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ..core.images import to_rgb_array
from ..core.masks import mask_to_instances
from ..data.cache import image_side_fingerprint, read_embedding
from ..data.transforms import jitter_boxes
from ..inference.predictor import SamPredictor
from . import object_metrics

logger = logging.getLogger(__name__)

if not hasattr(evaluate, "load"):
    raise ImportError(
        f"`import evaluate` found {getattr(evaluate, '__file__', evaluate)!r}, not the evaluate library: a file named "
        "evaluate.py on the import path (such as scripts/evaluate.py when its folder is on sys.path) shadows it."
    )


def load_object_metrics(**kwargs: Any) -> evaluate.EvaluationModule:
    """The per-object Dice/IoU `evaluate` module, loaded by path from sam_hf (no Hub access)."""
    return evaluate.load(object_metrics.__file__, **kwargs)


#: Objects per image kept, with full-resolution masks, for the figure of `evaluate_models` (bounds its memory).
FIGURE_MAX_OBJECTS = 256


def _object_crops(
    pred: np.ndarray, instances: np.ndarray, object_id: int, gt_slice: tuple[slice, slice] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The predicted and reference masks of one object, cropped to the bounding box of their union.

    Dice and IoU depend only on pixels inside that box; the reference is built from the instance map inside the
    crop only, so no full-resolution mask per object is ever made (`gt_slice` is the object's `find_objects` slice).
    """
    rows, cols = np.flatnonzero(pred.any(1)), np.flatnonzero(pred.any(0))
    r0, r1, c0, c1 = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) if len(rows) else (None,) * 4
    if gt_slice is not None:
        g_r, g_c = gt_slice
        r0, r1 = (g_r.start, g_r.stop) if r0 is None else (min(r0, g_r.start), max(r1, g_r.stop))
        c0, c1 = (g_c.start, g_c.stop) if c0 is None else (min(c0, g_c.start), max(c1, g_c.stop))
    if r0 is None:  # both empty
        return pred[:1, :1], np.zeros((1, 1), bool)
    sl = np.s_[r0:r1, c0:c1]
    return pred[sl], instances[sl] == object_id


def encoder_groups(predictors: dict[str, SamPredictor]) -> list[list[str]]:
    """The models' names grouped by identical image side (weights and image processor): each group shares one image
    encoding."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, predictor in predictors.items():
        key = (
            image_side_fingerprint(predictor.model),
            json.dumps(predictor.processor.image_processor.to_dict(), sort_keys=True, default=str),
        )
        groups.setdefault(key, []).append(name)
    logger.info("%d model(s), %d distinct image encoder(s)", len(predictors), len(groups))
    return list(groups.values())


def set_shared_image(
    group: list[SamPredictor], image: np.ndarray | None, cached: Any = None, row: dict | None = None
) -> None:
    """Encode `image` once (or take the `cached` features of `row`) for every predictor of one encoder group."""
    first = group[0]
    if cached is not None:
        first.set_image_embeddings(cached, row["original_sizes"], row["reshaped_input_sizes"])
    else:
        first.set_image(image)
    for predictor in group[1:]:
        predictor.set_image_embeddings(first.image_embeddings, first.original_size, first.reshaped_size)


def evaluate_models(
    predictors: dict[str, SamPredictor],
    dataset: datasets.Dataset,
    mask_type: str = "auto",
    box_jitter: float = 0.0,
    jitter_seed: int = 0,
    num_figure_images: int = 0,
    use_cached_embeddings: bool = False,
) -> dict[str, Any]:
    """Prompt every model with one box per object of every image and score each object.

    Args:
        predictors (`dict[str, SamPredictor]`): the models, by name.
        dataset (`datasets.Dataset`): `image` and `label` columns plus the `boxes` and `areas` columns of
            `index_objects`.
        mask_type (`str`, *optional*, defaults to `"auto"`): how masks become objects (see `mask_to_instances`).
        box_jitter (`float`, *optional*, defaults to 0): outward jitter of the boxes in pixels; the same jittered
            boxes go to every model.
        jitter_seed (`int`, *optional*, defaults to 0): seed of the jitter.
        num_figure_images (`int`, *optional*, defaults to 0): keep this many rows' predictions for a figure, spread
            evenly over the dataset (its first and last rows included).
        use_cached_embeddings (`bool`, *optional*, defaults to `False`): take each image's embedding from the
            dataset's `image_embeddings` column (`sam_hf.data.add_image_embeddings` with these models' shared,
            frozen encoder) instead of running the encoder again.

    Returns:
        A dict with `objects` (per object: `image`, `name`, `object_id`, `area`, and per model `dice`, `iou` and
        `predicted_iou`, the model's own estimate of that IoU, its `iou_scores`) and
        `figure_samples` (see `sam_hf.viz.plot_base_vs_tuned`; at most `FIGURE_MAX_OBJECTS` objects per image).

    Models whose vision encoders have identical weights and the same image processor share one image encoding.

    Memory does not grow with the number of objects of an image: boxes are decoded `chunk_size` at a time (each
    predictor's own `chunk_size`), so at most `chunk_size` x H x W booleans of predicted masks (plus the predictor's
    float32 logits for the same chunk) exist at once, and each object's reference mask is made only inside the
    bounding box of its prediction and ground truth. The figure images keep at most `FIGURE_MAX_OBJECTS` x H x W
    booleans per model and for the ground truth.
    """
    rng = np.random.default_rng(jitter_seed)
    groups = encoder_groups(predictors)
    if use_cached_embeddings and (len(groups) != 1 or "image_embeddings" not in dataset.column_names):
        raise ValueError(
            "use_cached_embeddings needs an `image_embeddings` column and models that share one image encoder."
        )

    metrics = {name: load_object_metrics(experiment_id=f"sam_hf_{name}") for name in predictors}
    predicted_iou: dict[str, list[float]] = {name: [] for name in predictors}
    objects: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    # Tiles and object crops (`sam_hf.data.windows`) are scored per source image: their rows name it.
    sources: dict[str, int] = {}
    # The figure's rows are spread over the dataset: neighbouring tiles or crops come from the same image.
    figure_rows = {round(i) for i in np.linspace(0, len(dataset) - 1, num_figure_images)} if len(dataset) else set()
    for idx in tqdm(range(len(dataset)), desc="Evaluating", unit="image"):
        row = dataset[idx]
        keep_figure = idx in figure_rows
        image = to_rgb_array(row["image"]) if not use_cached_embeddings or keep_figure else None
        instances = mask_to_instances(row["label"], mask_type)
        boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
        if box_jitter:
            boxes = jitter_boxes(boxes, box_jitter, instances.shape, rng)
        ids = np.arange(1, len(boxes) + 1)
        gt_slices = ndimage.find_objects(instances, max_label=len(ids))
        num_figure = min(len(boxes), FIGURE_MAX_OBJECTS) if keep_figure else 0
        name = str(row.get("file_name", idx))
        per_model: dict[str, np.ndarray] = {}
        for members in groups:
            cached = read_embedding(row) if use_cached_embeddings else None
            set_shared_image([predictors[m] for m in members], image, cached, row)
            for member in members:
                predictor = predictors[member]
                figure_masks = []
                for start in range(0, len(boxes), predictor.chunk_size):
                    result = predictor.predict(boxes=boxes[start : start + predictor.chunk_size])
                    masks = result.masks[:, 0]
                    predicted_iou[member].extend(result.scores[:, 0].tolist())
                    pairs = [
                        _object_crops(m, instances, int(ids[start + j]), gt_slices[start + j])
                        for j, m in enumerate(masks)
                    ]
                    metrics[member].add_batch(predictions=[p for p, _ in pairs], references=[g for _, g in pairs])
                    if start < num_figure:
                        figure_masks.append(masks[: num_figure - start].copy())
                    del masks, pairs, result
                if keep_figure:
                    per_model[member] = (
                        np.concatenate(figure_masks) if figure_masks else np.zeros((0, *instances.shape), bool)
                    )
        image_id, image_name = idx, name
        if row.get("source_file_name") is not None:
            image_name = row["source_file_name"]
            image_id = sources.setdefault(image_name, len(sources))
        for k, area in enumerate(row["areas"]):
            objects.append({"image": image_id, "name": image_name, "object_id": int(ids[k]), "area": int(area)})
        if keep_figure:
            if num_figure < len(boxes):
                logger.info("Figure: image %s shows its first %d of %d objects", name, num_figure, len(boxes))
            samples.append(
                {
                    "image": image,
                    "gt_masks": instances[None] == ids[:num_figure, None, None],
                    "boxes": boxes[:num_figure],
                    "predictions": per_model,
                    "name": name,
                    "first_object": len(objects) - len(boxes),
                }
            )

    for model_name, metric in metrics.items():
        result = metric.compute(return_per_object=True)
        if result["num_objects"] != len(objects):
            raise RuntimeError(f"{model_name}: scored {result['num_objects']} objects, expected {len(objects)}.")
        for obj, d, i, p in zip(objects, result["dice"], result["iou"], predicted_iou[model_name]):
            obj.setdefault("dice", {})[model_name] = float(d)
            obj.setdefault("iou", {})[model_name] = float(i)
            obj.setdefault("predicted_iou", {})[model_name] = float(p)
    for sample in samples:
        first, k = sample.pop("first_object"), len(sample["boxes"])
        sample["dice"] = {m: np.array([o["dice"][m] for o in objects[first : first + k]]) for m in predictors}
    return {"objects": objects, "figure_samples": samples}

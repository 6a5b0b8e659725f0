"""Side-by-side evaluation of SAM checkpoints with box prompts: `scripts/evaluate.py` and its library functions.

Per object: Dice and IoU at the original resolution, from the `sam_hf.object_metrics` evaluate module. Reported per
model: mean, median and count; per-image means; and a breakdown by object-size tercile (small objects are where SAM
fails). Written as `metrics.json` and `metrics.md`, plus a base-vs-tuned figure when matplotlib is installed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from . import object_metrics

if not hasattr(evaluate, "load"):
    raise ImportError(
        f"`import evaluate` found {getattr(evaluate, '__file__', evaluate)!r}, not the evaluate library: a file named "
        "evaluate.py on the import path (such as scripts/evaluate.py when its folder is on sys.path) shadows it."
    )
from .cache import image_side_fingerprint, read_embedding
from .config import DataArguments
from .data import jitter_boxes, load_source, mask_to_instances, prepare_split, split_source, to_rgb_array
from .inference import SamPredictor, default_device
from .interactive import interactive_curve

logger = logging.getLogger(__name__)

__all__ = [
    "EvaluateArguments",
    "evaluate_automatic",
    "evaluate_models",
    "load_object_metrics",
    "parse_model_specs",
    "run_evaluation",
    "summarize",
    "to_markdown",
]

TERCILES = ("small", "medium", "large")


@dataclass
class EvaluateArguments:
    """What to evaluate and where to write it (the data side is `DataArguments`, as for training)."""

    model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "One or more models as name=path_or_hub_id (or just a path; the name is then its folder name), "
            "e.g. --model base=facebook/sam-vit-base tuned=runs/my-run"
        },
    )
    output_dir: str = field(default="eval", metadata={"help": "Where metrics.json, metrics.md and figures go."})
    split: str = field(
        default="eval",
        metadata={
            "help": "'eval': the held-out split train.py evaluates on (same --seed and --validation_split_percentage "
            "carve it the same way); 'train': the training split."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed that carved the eval split (train.py's --seed)."})
    box_jitter: float = field(
        default=0.0, metadata={"help": "Jitter eval boxes outward by up to this many pixels (robustness); 0 = exact."}
    )
    jitter_seed: int = field(default=0, metadata={"help": "Seed of the box jitter; the same boxes for every model."})
    chunk_size: int = field(default=64, metadata={"help": "Prompts decoded and upsampled at once."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; cuda if available, else cpu."})
    num_figure_images: int = field(default=4, metadata={"help": "Images in the base-vs-tuned figure (0 = none)."})
    automatic: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate automatic mask generation (pipeline('mask-generation')): per ground-truth object "
            "the best IoU of any generated mask, recall and precision at IoU 0.5."
        },
    )
    points_per_crop: int = field(default=16, metadata={"help": "Automatic mode: points per side of the point grid."})
    crops_n_layers: int = field(
        default=0,
        metadata={"help": "Automatic mode: the pipeline's crop layers (layer k adds 4^k crops of the image; slower)."},
    )
    pred_iou_thresh: float = field(
        default=0.88,
        metadata={"help": "Automatic mode: keep masks whose predicted IoU reaches this (pipeline default)."},
    )
    stability_score_thresh: float = field(
        default=0.95, metadata={"help": "Automatic mode: keep masks at least this stable (pipeline default)."}
    )
    interactive_clicks: int = field(
        default=0,
        metadata={
            "help": "Also simulate interactive correction (0: off): per object, Dice after the first prompt (an exact "
            "box, and separately one click at the object's innermost pixel) and after each of this many correction "
            "clicks at the innermost pixel of the larger error region, the previous logits fed back as mask prompt. "
            "Writes interactive_curve.png."
        },
    )
    interactive_max_objects: int = field(
        default=16,
        metadata={"help": "Interactive mode: objects per image (the first ones), to bound its cost."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hub download cache."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or data; never logged."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("Give at least one --model (name=path_or_hub_id).")
        if self.split not in ("eval", "train"):
            raise ValueError(f"--split must be 'eval' or 'train', got {self.split!r}.")
        if self.interactive_clicks < 0 or self.interactive_max_objects < 1:
            raise ValueError(
                f"--interactive_clicks must be >= 0 and --interactive_max_objects >= 1, got {self.interactive_clicks} "
                f"and {self.interactive_max_objects}."
            )
        if self.box_jitter < 0:
            raise ValueError(f"--box_jitter must be >= 0 pixels, got {self.box_jitter}.")
        if self.crops_n_layers < 0:
            raise ValueError(f"--crops_n_layers must be >= 0, got {self.crops_n_layers}.")


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """`["base=a", "runs/b"]` -> `{"base": "a", "b": "runs/b"}`; names must be unique."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        if not name or not path:
            raise ValueError(f"--model {spec!r}: expected name=path_or_hub_id or a path.")
        if name in models:
            raise ValueError(f"--model name {name!r} is used twice; give each model its own name (name=path).")
        models[name] = path
    return models


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
            dataset's `image_embeddings` column (`sam_hf.cache.add_image_embeddings` with these models' shared,
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
    # Tiles and object crops (`sam_hf.tiling`) are scored per source image: their rows name it.
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


def evaluate_interactive(
    predictors: dict[str, SamPredictor],
    dataset: datasets.Dataset,
    num_clicks: int,
    mask_type: str = "auto",
    max_objects_per_image: int = 16,
) -> dict[str, Any]:
    """Mean Dice after the first prompt and after each correction click, per model and first prompt (`box`,
    `point`), as `sam_hf.interactive.interactive_curve` simulates a user.

    Returns:
        `{"num_clicks": N, "num_objects": n, "models": {name: {"box": [N + 1 means], "point": [...]}}}`.
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}.")
    curves: dict[str, dict[str, list[list[float]]]] = {name: {"box": [], "point": []} for name in predictors}
    groups = encoder_groups(predictors)
    for idx in tqdm(range(len(dataset)), desc="Interactive evaluation", unit="image"):
        row = dataset[idx]
        image = to_rgb_array(row["image"])
        instances = mask_to_instances(row["label"], mask_type)
        boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)[:max_objects_per_image]
        for group in groups:
            set_shared_image([predictors[name] for name in group], image)
        for name, predictor in predictors.items():
            for k, box in enumerate(boxes):
                target = instances == k + 1
                curves[name]["box"].append(interactive_curve(predictor, target, box, num_clicks))
                curves[name]["point"].append(interactive_curve(predictor, target, None, num_clicks))
    n = len(next(iter(curves.values()))["box"])
    return {
        "num_clicks": num_clicks,
        "num_objects": n,
        "max_objects_per_image": max_objects_per_image,
        "models": {
            name: {start: np.mean(np.asarray(c), axis=0).tolist() for start, c in by_start.items()}
            for name, by_start in curves.items()
        },
    }


def _best_ious(
    generated: Any, instances: np.ndarray, num_objects: int, scores: Any = None
) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Match generated masks against the objects `1..num_objects` of an instance map, one mask at a time.

    Returns:
        `(best, matched, count, hits)`: per object the best IoU of any generated mask `(num_objects,)` (0 if none),
        the number of generated masks whose best IoU with some object is at least 0.5, the number of masks, and per
        mask (in the order given) whether it is a true positive at IoU 0.5 when masks claim objects one to one in
        descending `scores` (the order given without scores), each taking the free object it overlaps most, as
        COCO's matching does.

    Intersections come from a histogram of the instance ids under each mask, so memory is one mask, one `(H, W)`
    instance map and a few arrays of `num_objects` numbers, whatever the number of objects or masks; no
    `(objects, H, W)` or `(masks, objects)` array is made.
    """
    flat = instances.ravel()
    gt_area = np.bincount(flat, minlength=num_objects + 1)[1 : num_objects + 1].astype(np.float64)
    best = np.zeros(num_objects)
    taken = np.zeros(num_objects, bool)
    generated = list(generated)
    order = np.arange(len(generated)) if scores is None else np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.zeros(len(generated), bool)
    matched = 0
    for i in order:
        mask = generated[i]
        mask = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=bool).ravel()
        inter = np.bincount(flat[mask], minlength=num_objects + 1)[1 : num_objects + 1].astype(np.float64)
        union = mask.sum() + gt_area - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        np.maximum(best, iou, out=best)
        matched += bool(num_objects and iou.max() >= 0.5)
        free = np.where(~taken & (iou >= 0.5))[0]
        if len(free):
            taken[free[np.argmax(iou[free])]] = hits[i] = True
    return best, matched, len(generated), hits


def average_precision(scores: Any, hits: Any, num_objects: int) -> float:
    """Average precision of scored detections at one IoU threshold, as COCO computes it.

    Args:
        scores (`array-like`): `(M,)` confidence of each detection, over all images.
        hits (`array-like`): `(M,)` whether each detection is a true positive (see `_best_ious`).
        num_objects (`int`): ground-truth objects over all images.

    Returns:
        The mean, over the 101 recall levels 0, 0.01, ..., 1, of the highest precision reached at that recall or
        above (0 where the recall is never reached). 0 when there are no objects.
    """
    if num_objects <= 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp = np.asarray(hits, np.float64)[order]
    if not len(tp):
        return 0.0
    true_positives = np.cumsum(tp)
    precision = true_positives / np.arange(1, len(tp) + 1)
    recall = true_positives / num_objects
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    first = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.where(first < len(tp), envelope[np.minimum(first, len(tp) - 1)], 0.0).mean())


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
            (`sam_hf.tiling.refine_on_object_crops`), as `sam-hf autolabel` does for a crop-tuned model.

    Returns:
        Per model: `num_masks` (generated, all images), `mean_best_iou` (per ground-truth object, the best IoU of any
        generated mask, 0 if none), `recall@0.5` (objects matched at IoU >= 0.5), `precision@0.5` (generated masks
        matching some object at IoU >= 0.5) and `ap@0.5` (average precision of the masks ranked by their scores,
        matched one to one: whether the scores put good masks first).

    Ground-truth objects are matched through the instance map (see `_best_ious`), never as `(objects, H, W)`
    masks: besides the pipeline's own output, memory is one mask and a few numbers per object at a time.
    """
    from PIL import Image
    from transformers import pipeline

    from .tiling import refine_on_object_crops

    out = {}
    for name, model in models.items():
        if not isinstance(model, SamPredictor) and object_crop_scale:
            model = SamPredictor.from_pretrained(str(model), device=device)
        if isinstance(model, SamPredictor):
            kwargs = {"model": model.model, "image_processor": model.processor.image_processor}
        else:
            kwargs = {"model": str(model)}
        generator = pipeline("mask-generation", device=device, **kwargs)
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
            image_best, image_matched, count, hits = _best_ious(masks, instances, int(instances.max()), scores)
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


def summarize(objects: list[dict[str, Any]], model_names: list[str]) -> dict[str, Any]:
    """Mean / median / count per model, per-image means, and size terciles (edges from ground-truth areas)."""
    areas = np.array([o["area"] for o in objects], np.float64)
    edges = np.quantile(areas, [1 / 3, 2 / 3]).tolist()
    # Tercile by area: small <= q1 < medium <= q2 < large.
    tercile = np.digitize(areas, edges, right=True)
    images = sorted({o["image"] for o in objects})
    summary: dict[str, Any] = {
        "num_images": len(images),
        "num_objects": len(objects),
        "size_tercile_edges_px": edges,
        "models": {},
    }
    for m in model_names:
        dice = np.array([o["dice"][m] for o in objects])
        iou = np.array([o["iou"][m] for o in objects])
        image_of = np.array([o["image"] for o in objects])
        per_image = [
            {
                "image": int(i),
                "name": next(o["name"] for o in objects if o["image"] == i),
                "num_objects": int((image_of == i).sum()),
                "dice": float(dice[image_of == i].mean()),
                "iou": float(iou[image_of == i].mean()),
            }
            for i in images
        ]
        terciles = {}
        for t, label in enumerate(TERCILES):
            sel = tercile == t
            terciles[label] = {
                "num_objects": int(sel.sum()),
                "area_px": [float(areas[sel].min()), float(areas[sel].max())] if sel.any() else None,
                "dice": float(dice[sel].mean()) if sel.any() else None,
                "iou": float(iou[sel].mean()) if sel.any() else None,
            }
        predicted = np.array([o["predicted_iou"][m] for o in objects])
        summary["models"][m] = {
            "num_objects": len(objects),
            "dice": {"mean": float(dice.mean()), "median": float(np.median(dice))},
            "iou": {"mean": float(iou.mean()), "median": float(np.median(iou))},
            "predicted_iou": {"mean": float(predicted.mean()), "correlation": _correlation(predicted, iou)},
            "per_image_mean": {
                "dice": float(np.mean([p["dice"] for p in per_image])),
                "iou": float(np.mean([p["iou"] for p in per_image])),
            },
            "size_terciles": terciles,
            "per_image": per_image,
        }
    return summary


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two samples; `None` where it is undefined (fewer than 2 values, or a constant)."""
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def to_markdown(summary: dict[str, Any]) -> str:
    """Markdown tables of a `summarize` result."""
    models = summary["models"]
    lines = [
        f"Evaluated on {summary['num_images']} images, {summary['num_objects']} objects.",
        "",
        "| model | objects | mean Dice | median Dice | mean IoU | median IoU | per-image mean Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        lines.append(
            f"| {name} | {m['num_objects']} | {m['dice']['mean']:.4f} | {m['dice']['median']:.4f} | "
            f"{m['iou']['mean']:.4f} | {m['iou']['median']:.4f} | {m['per_image_mean']['dice']:.4f} |"
        )
    lines += [
        "",
        "Predicted IoU (the model's `iou_scores` for its box-prompted mask) against the actual IoU, per object:",
        "",
        "| model | mean predicted IoU | mean actual IoU | correlation |",
        "|---|---|---|---|",
    ]
    for name, m in models.items():
        corr = m["predicted_iou"]["correlation"]
        lines.append(
            f"| {name} | {m['predicted_iou']['mean']:.4f} | {m['iou']['mean']:.4f} | "
            f"{'-' if corr is None else f'{corr:.3f}'} |"
        )
    first = next(iter(models.values()))["size_terciles"]
    heads = [
        f"{t} ({v['area_px'][0]:g}-{v['area_px'][1]:g} px, n={v['num_objects']})" if v["area_px"] else f"{t} (n=0)"
        for t, v in first.items()
    ]
    lines += ["", "Mean Dice by object-size tercile:", "", "| model | " + " | ".join(heads) + " |"]
    lines.append("|---|" + "---|" * len(heads))
    for name, m in models.items():
        cells = [f"{v['dice']:.4f}" if v["dice"] is not None else "-" for v in m["size_terciles"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per-image mean Dice:", "", "| image | objects | " + " | ".join(models) + " |"]
    lines.append("|---|---|" + "---|" * len(models))
    per_image = {name: m["per_image"] for name, m in models.items()}
    for j, row in enumerate(next(iter(per_image.values()))):
        cells = [f"{per_image[name][j]['dice']:.4f}" for name in models]
        lines.append(f"| {row['name']} | {row['num_objects']} | " + " | ".join(cells) + " |")
    if "automatic" in summary:
        st = summary["automatic_settings"]
        extras = "".join(
            [
                f", crops_n_layers {st['crops_n_layers']}" if st.get("crops_n_layers") else "",
                f", each mask decoded again on its object crop ({st['object_crop_scale']:g} x its box)"
                if st.get("object_crop_scale")
                else "",
            ]
        )
        lines += [
            "",
            f"Automatic mask generation (pipeline('mask-generation'), {st['points_per_crop']}x{st['points_per_crop']} "
            f"points, pred_iou_thresh {st['pred_iou_thresh']}, "
            f"stability_score_thresh {st['stability_score_thresh']}{extras}):",
            "",
            "| model | masks | mean best IoU per object | recall@0.5 | precision@0.5 | AP@0.5 |",
            "|---|---|---|---|---|---|",
        ]
        for name, a in summary["automatic"].items():
            lines.append(
                f"| {name} | {a['num_masks']} | {a['mean_best_iou']:.4f} | {a['recall@0.5']:.4f} | "
                f"{a['precision@0.5']:.4f} | {a['ap@0.5']:.4f} |"
            )
    if "interactive" in summary:
        inter = summary["interactive"]
        clicks = range(inter["num_clicks"] + 1)
        lines += [
            "",
            f"Interactive correction ({inter['num_objects']} objects, at most {inter['max_objects_per_image']} per "
            "image): mean Dice after the first prompt and each correction click.",
            "",
            "| model | first prompt | " + " | ".join(f"{c} click{'s' if c != 1 else ''}" for c in clicks) + " |",
            "|---|---|" + "---|" * len(clicks),
        ]
        for name, by_start in inter["models"].items():
            for start, values in by_start.items():
                lines.append(f"| {name} | {start} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


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
    dataset = prepare_split(rows, data_args, eval_args.split)
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
        from .viz import plot_interactive_curve, save_figure

        save_figure(plot_interactive_curve(interactive), path)
    except Exception as err:  # an optional figure never fails an evaluation
        logger.warning("Skipping %s: %s: %s", path.name, type(err).__name__, err)


def _save_figure(samples: list[dict[str, Any]], path: Path) -> None:
    try:
        from .viz import plot_base_vs_tuned, save_figure
    except ImportError as err:
        logger.warning("Skipping %s: %s (install sam_hf[viz] for figures).", path.name, err)
        return
    save_figure(plot_base_vs_tuned(samples), path)

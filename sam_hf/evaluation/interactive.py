"""Interactive evaluation: Dice after each simulated correction click."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..core.clicks import interior_point, next_click
from ..core.images import to_rgb_array
from ..core.masks import mask_to_instances
from ..core.scores import dice_per_object
from ..inference.predictor import SamPredictor
from .boxes import encoder_groups, set_shared_image


def evaluate_interactive(
    predictors: dict[str, SamPredictor],
    dataset: datasets.Dataset,
    num_clicks: int,
    mask_type: str = "auto",
    max_objects_per_image: int = 16,
) -> dict[str, Any]:
    """Mean Dice after the first prompt and after each correction click, per model and first prompt (`box`,
    `point`), as `sam_hf.evaluation.interactive_curve` simulates a user.

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


def interactive_curve(predictor: Any, target: np.ndarray, box: np.ndarray | None, num_clicks: int) -> list[float]:
    """Dice of one object after its first prompt and after each of `num_clicks` correction clicks.

    The image must already be set on `predictor` (`SamPredictor.set_image`). The first prompt is `box` (xyxy) when
    given, otherwise one positive click at the object's `interior_point`. Each correction adds `next_click` to the
    clicks so far and feeds the previous low-resolution logits back as `mask_input`. When the mask becomes exact,
    the remaining entries repeat its Dice (1.0).
    """
    points: list[np.ndarray] = []
    labels: list[int] = []
    if box is None:
        points.append(interior_point(target))
        labels.append(1)
    scores, mask_input = [], None
    for _ in range(num_clicks + 1):
        prompts: dict[str, Any] = {}
        if box is not None:
            prompts["boxes"] = np.asarray(box, np.float64)[None]
        if points:
            prompts["points"] = np.stack(points)[None]
            prompts["point_labels"] = np.asarray(labels)[None]
        result = predictor.predict(**prompts, mask_input=mask_input)
        pred = result.masks[0, 0]
        scores.append(float(dice_per_object(pred[None], target[None])[0]))
        if len(scores) == num_clicks + 1:
            break
        click = next_click(pred, target)
        if click is None:
            scores.extend([scores[-1]] * (num_clicks + 1 - len(scores)))
            break
        points.append(click[0])
        labels.append(click[1])
        mask_input = result.logits[0, 0]
    return scores

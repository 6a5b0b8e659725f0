"""Batches: examples stacked, the number of objects padded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .transforms import LABEL_PAD


def _stack_levels(items: list[Any]) -> Any:
    """Stack per-example image inputs: tensors, or tuples of feature levels (SAM-HQ, SAM 2) stacked level by level."""
    if isinstance(items[0], (list, tuple)):
        return [torch.stack(level) for level in zip(*items)]
    return torch.stack(items)


@dataclass
class SamDataCollator:
    """Stack examples from `SamTransform`, padding the number of objects to the batch maximum.

    Padded objects get an all-zero box (and point), `-100` labels and object id 0. Instance maps are padded with
    background to the largest image of the batch.

    Args:
        pad_to_multiple_of (`int`, *optional*): pad the number of objects up to a multiple of this, so that batches
            take few distinct shapes (`torch.compile` then compiles once instead of once per object count).
    """

    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        k = max(f["input_boxes"].shape[0] for f in features)
        if self.pad_to_multiple_of:
            k = -(-k // self.pad_to_multiple_of) * self.pad_to_multiple_of
        # Evaluation rows with instances carry no labels (SamTransform(train=False, with_instances=True)).
        has_labels = "labels" in features[0]
        m = features[0]["labels"].shape[-1] if has_labels else 0
        image_key = "image_embeddings" if "image_embeddings" in features[0] else "pixel_values"
        batch = {
            image_key: _stack_levels([f[image_key] for f in features]),
            "input_boxes": torch.zeros(len(features), k, 4),
            "original_sizes": torch.stack([f["original_sizes"] for f in features]),
            "reshaped_input_sizes": torch.stack([f["reshaped_input_sizes"] for f in features]),
        }
        if has_labels:
            batch["labels"] = torch.full((len(features), k, m, m), LABEL_PAD)
        if "input_points" in features[0]:
            batch["input_points"] = torch.zeros(len(features), k, 1, 2)
            batch["input_labels"] = torch.ones(len(features), k, 1, dtype=torch.long)
        if "point_labels" in features[0]:
            batch["point_labels"] = torch.full((len(features), k, m, m), LABEL_PAD)
            batch["point_only"] = torch.stack([f["point_only"] for f in features])
        if "background_points" in features[0]:
            batch["background_points"] = torch.stack([f["background_points"] for f in features])
            batch["background_labels"] = torch.stack([f["background_labels"] for f in features])
        for i, f in enumerate(features):
            n = f["input_boxes"].shape[0]
            batch["input_boxes"][i, :n] = f["input_boxes"]
            if has_labels:
                batch["labels"][i, :n] = f["labels"]
            if "input_points" in f:
                batch["input_points"][i, :n] = f["input_points"]
            if "point_labels" in f:
                batch["point_labels"][i, :n] = f["point_labels"]
        if "instances" in features[0]:
            h = max(f["instances"].shape[0] for f in features)
            w = max(f["instances"].shape[1] for f in features)
            batch["instances"] = torch.zeros(len(features), h, w, dtype=torch.int32)
            batch["object_ids"] = torch.zeros(len(features), k, dtype=torch.int32)
            for i, f in enumerate(features):
                hh, ww = f["instances"].shape
                batch["instances"][i, :hh, :ww] = f["instances"]
                batch["object_ids"][i, : f["object_ids"].shape[0]] = f["object_ids"]
        return batch

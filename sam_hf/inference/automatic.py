"""Automatic masks: transformers' `mask-generation` pipeline on a sam_hf model, and the object-crop scale a model was
tuned with, which every automatic path refines on."""

from __future__ import annotations

import os
from typing import Any

from transformers import Pipeline, pipeline

from .predictor import SamPredictor


def mask_generation_pipeline(model: SamPredictor | str | os.PathLike, device: Any = None) -> Pipeline:
    """`pipeline("mask-generation")` on a loaded `SamPredictor` (sharing its model, processor and device), or on a
    model directory or Hub id, which the pipeline loads itself.

    Args:
        model (`SamPredictor`, `str` or `os.PathLike`): the model.
        device (*optional*): the pipeline's device when `model` is a path; a predictor's own device otherwise.

    >>> generator = mask_generation_pipeline(SamPredictor.from_pretrained("runs/demo"))  # doctest: +SKIP
    >>> masks = generator(image, points_per_crop=32)["masks"]  # doctest: +SKIP
    """
    if isinstance(model, SamPredictor):
        kwargs = {"model": model.model, "image_processor": model.processor.image_processor}
        device = model.device
    else:
        kwargs = {"model": os.fspath(model)}
    return pipeline("mask-generation", device=device, **kwargs)


def trained_crop_scale(model: Any) -> float | None:
    """The object-crop scale a model was tuned with (`train.py --object_crop_scale`, kept in its config.json), or
    `None` for a model tuned on whole images or tiles.

    Args:
        model: a `SamPredictor`, a model or a config.
    """
    model = getattr(model, "model", model)
    return getattr(getattr(model, "config", model), "object_crop_scale", None) or None

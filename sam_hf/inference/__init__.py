"""Inference: the predictor (encode once, decode any prompt), windowed predictors (tiles, object crops) and
text prompts."""

from __future__ import annotations

from .automatic import mask_generation_pipeline, trained_crop_scale
from .predictor import SamPrediction, SamPredictor
from .text_prompts import (
    DEFAULT_TEXT_MODEL,
    TextPrompter,
    TextSegmentation,
    check_text,
    heatmap_image,
    heatmap_to_boxes,
)
from .windowed import ObjectCropPredictor, TiledPredictor, refine_on_object_crops

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "ObjectCropPredictor",
    "SamPrediction",
    "SamPredictor",
    "TextPrompter",
    "TextSegmentation",
    "TiledPredictor",
    "check_text",
    "heatmap_image",
    "heatmap_to_boxes",
    "mask_generation_pipeline",
    "refine_on_object_crops",
    "trained_crop_scale",
]

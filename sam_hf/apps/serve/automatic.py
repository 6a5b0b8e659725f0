"""`/segment/auto`: automatic masks from transformers' `mask-generation` pipeline on the served model."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from PIL import Image

from ...inference.automatic import mask_generation_pipeline
from ...inference.windowed import refine_on_object_crops
from .model import _LoadedModel
from .requests import _encode_masks, _json_body
from .settings import MaskFormat

logger = logging.getLogger(__name__)


class _AutoMasks:
    """Automatic masks of the served model; the pipeline is built on the first request and kept (one per server).

    Args:
        model (`_LoadedModel`): the served model, its limits and its jobs.
    """

    def __init__(self, model: _LoadedModel):
        self.model = model
        self._generator: Any = None
        self._error: str | None = None

    def generator(self) -> Any:
        """The `mask-generation` pipeline on the loaded model, built on first use (call inside a model call); 503 if
        it cannot be built, while `/segment` keeps working."""
        if self._generator is None and self._error is None:
            predictor = self.model.predictor
            try:
                self._generator = mask_generation_pipeline(predictor)
            except Exception as err:  # e.g. torchvision missing; /segment keeps working
                logger.exception("Could not build the mask-generation pipeline.")
                self._error = f"{type(err).__name__}: {err}"
        if self._generator is None:
            raise HTTPException(503, f"Automatic mask generation is unavailable: {self._error}")
        return self._generator

    def segment(
        self,
        cancelled: threading.Event,
        data: bytes,
        mask_format: MaskFormat,
        points_per_side: int,
        pipeline_kwargs: dict[str, float],
    ) -> bytes:
        """The `/segment/auto` answer (JSON bytes): the pipeline's masks on a `points_per_side`^2 grid, each refined
        on its own object crop when the model was tuned on crops."""
        model = self.model
        image = model.image(data)
        model.check_mask_pixels(
            3 * points_per_side**2, image, f"Up to 3 x {points_per_side}^2 masks for points_per_side={points_per_side}"
        )
        pixels = image.load()
        with model.jobs.model_call(cancelled):
            outputs = self.generator()(
                Image.fromarray(pixels),
                points_per_crop=points_per_side,
                points_per_batch=model.chunk_size(3, image),
                **pipeline_kwargs,
            )
            masks = [np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m, dtype=bool) for m in outputs["masks"]]
            scores = outputs["scores"]
            scores = scores.cpu().float().tolist() if isinstance(scores, torch.Tensor) else [float(s) for s in scores]
            cropped = model.crop_scale
            if cropped:
                model.predictor.chunk_size = model.chunk_size(1, image)
                refined, refined_scores = refine_on_object_crops(
                    model.predictor, pixels, masks, cropped, pipeline_kwargs.get("crops_nms_thresh", 0.7)
                )
                masks, scores = list(refined), refined_scores.tolist()
        return _json_body(
            {
                "width": image.width,
                "height": image.height,
                "mask_format": mask_format,
                "points_per_side": points_per_side,
                "object_crop_scale": cropped,
                "masks": [_encode_masks(m, mask_format) for m in masks],
                "scores": scores,
            }
        )

"""The `text` field of `/segment`: CLIPSeg's heat map of a phrase gives box prompts, SAM a mask per box."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from fastapi import HTTPException

from ...inference.text_prompts import check_text
from ...inference.windowed import ObjectCropPredictor
from .model import _LoadedModel
from .requests import _DecodedImage, _encode_masks, _json_body
from .settings import MaskFormat

logger = logging.getLogger(__name__)


class _TextMasks:
    """Text-prompted masks of the served model; the CLIPSeg model (`ServeSettings.text_model`) loads on the first
    text request and is kept (one per server).

    Args:
        model (`_LoadedModel`): the served model, its limits and its jobs.
    """

    def __init__(self, model: _LoadedModel):
        self.model = model
        self._prompter: Any = None
        self._error: str | None = None

    def prompter(self) -> Any:
        """The CLIPSeg `TextPrompter`, built on first use (call inside a model call); 503 if it cannot be loaded,
        while box and point prompts keep working."""
        if self._prompter is None and self._error is None:
            from ...inference.text_prompts import TextPrompter

            settings = self.model.settings
            try:
                self._prompter = TextPrompter.from_pretrained(
                    settings.text_model,
                    device=self.model.predictor.device,
                    max_boxes=min(settings.max_prompts, settings.max_boxes_and_points),
                )
            except Exception as err:  # e.g. an offline server without the checkpoint; box prompts keep working
                logger.exception("Could not load the text model %s.", settings.text_model)
                self._error = f"{type(err).__name__}: {err}"
        if self._prompter is None:
            raise HTTPException(503, f"Text prompts are unavailable: {self._error}")
        return self._prompter

    def segment(
        self, cancelled: threading.Event, image: _DecodedImage, text: str, prompts: dict[str, Any], fmt: MaskFormat
    ) -> bytes:
        """The `/segment` answer (JSON bytes) for `text`: masks for the blobs of CLIPSeg's heat map, one box prompt
        each (see `sam_hf.inference.text_prompts`)."""
        if any(prompts.get(k) is not None for k in ("boxes", "points", "point_labels", "mask_input")):
            raise HTTPException(422, "Give either `text` or box/point `prompts`, not both.")
        try:
            text = check_text(text)
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        model = self.model
        multimask = prompts.get("multimask_output", False)
        per_prompt = 3 if multimask else 1
        pixels = image.load()
        with model.jobs.model_call(cancelled):
            _, boxes, peaks = self.prompter().boxes(pixels, text)
            model.check_mask_pixels(len(boxes) * per_prompt, image, f"{len(boxes)} text boxes x {per_prompt} masks")
            model.predictor.chunk_size = model.chunk_size(per_prompt, image)
            cropped = model.crop_scale
            predictor = ObjectCropPredictor(model.predictor, cropped) if cropped else model.predictor
            predictor.set_image(pixels)
            masks = np.zeros((0, per_prompt, image.height, image.width), bool)
            scores = np.zeros((0, per_prompt))
            if len(boxes):
                result = predictor.predict(boxes=boxes, multimask_output=multimask)
                masks, scores = result.masks, result.scores
        return _json_body(
            {
                "width": image.width,
                "height": image.height,
                "mask_format": fmt,
                "multimask_output": multimask,
                "object_crop_scale": cropped,
                "text": text,
                "boxes": boxes.tolist(),
                "text_peaks": peaks.tolist(),
                "masks": _encode_masks(masks, fmt) if len(masks) else [],
                "scores": scores.tolist(),
            }
        )

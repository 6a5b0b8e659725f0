"""The model service behind the app: box and point prompts here; automatic masks, text prompts and the jobs that
run them in their own modules."""

from __future__ import annotations

import threading

from fastapi import HTTPException

from ...core.prompts import validate_prompts
from ...inference.windowed import ObjectCropPredictor
from .automatic import _AutoMasks
from .jobs import _Jobs
from .model import _LoadedModel
from .requests import _encode_masks, _json_body, _parse_prompts, _previous_mask
from .settings import MaskFormat, ServeSettings, _check_prompt_work
from .text import _TextMasks


class _ModelService:
    """One model serving the app: `segment` answers `/segment`, `auto` answers `/segment/auto` and `text` the
    `text` field of `/segment`; `jobs` runs each request's work in a worker thread, one model call at a time.

    Args:
        model (`str`): a directory written by `save_pretrained` or a Hub id.
        settings (`ServeSettings`): limits and device.
    """

    def __init__(self, model: str, settings: ServeSettings):
        self.model = _LoadedModel(model, settings)
        self.auto = _AutoMasks(self.model)
        self.text = _TextMasks(self.model)
        self.ready = True

    @property
    def jobs(self) -> _Jobs:
        return self.model.jobs

    @property
    def device(self) -> str:
        return self.model.device

    def close(self) -> None:
        self.ready = False
        self.jobs.close()

    def segment(
        self,
        cancelled: threading.Event,
        data: bytes,
        prompts_text: str,
        mask_format: MaskFormat,
        text: str | None = None,
    ) -> bytes:
        """The `/segment` answer (JSON bytes) for box and point prompts, or for `text` (see `_TextMasks`)."""
        model = self.model
        prompts = _parse_prompts(prompts_text)
        image = model.image(data)
        if text is not None:
            return self.text.segment(cancelled, image, text, prompts, mask_format)
        try:
            boxes, points, labels = validate_prompts(
                (image.height, image.width), prompts.get("boxes"), prompts.get("points"), prompts.get("point_labels")
            )
        except (ValueError, TypeError, OverflowError, RecursionError) as err:
            raise HTTPException(422, f"Invalid prompts: {err}") from err
        count = len(boxes) if boxes is not None else len(points)
        _check_prompt_work(model.settings, count, boxes, points)
        multimask = prompts.get("multimask_output", False)
        per_prompt = 3 if multimask else 1
        model.check_mask_pixels(count * per_prompt, image, f"{count} prompts x {per_prompt} masks")
        previous = _previous_mask(prompts.get("mask_input"), count, image)
        pixels = image.load()
        with model.jobs.model_call(cancelled):
            model.predictor.chunk_size = model.chunk_size(per_prompt, image)
            # A crop needs a box, and a previous mask is in the whole image's frame.
            cropped = model.crop_scale if boxes is not None and previous is None else None
            predictor = ObjectCropPredictor(model.predictor, cropped) if cropped else model.predictor
            predictor.set_image(pixels)
            mask_input = model.predictor.mask_input_from_mask(previous) if previous is not None else None
            result = predictor.predict(
                boxes=boxes, points=points, point_labels=labels, multimask_output=multimask, mask_input=mask_input
            )
        return _json_body(
            {
                "width": image.width,
                "height": image.height,
                "mask_format": mask_format,
                "multimask_output": multimask,
                "object_crop_scale": cropped,
                "masks": _encode_masks(result.masks, mask_format),
                "scores": result.scores.tolist(),
            }
        )

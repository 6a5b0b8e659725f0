"""The model service: one model, its predictor and pipelines, behind a lock."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from PIL import Image

from ...core.env import default_device
from ...core.prompts import validate_prompts
from ...inference.predictor import SamPredictor
from ...inference.text_prompts import check_text
from ...inference.windowed import ObjectCropPredictor, refine_on_object_crops
from .requests import _DecodedImage, _encode_masks, _parse_prompts, _previous_mask
from .settings import _CHUNK_ELEMENTS, MaskFormat, ServeSettings

logger = logging.getLogger(__name__)


class _Cancelled(Exception):
    """The request timed out before its model call started; nobody waits for its result."""


class _ModelService:
    def __init__(self, model: str, settings: ServeSettings):
        device = default_device(settings.device)
        start = time.perf_counter()
        self.model_id = model
        self.settings = settings
        self.predictor = SamPredictor.from_pretrained(model, device=device)
        trained = getattr(self.predictor.model.config, "object_crop_scale", None)
        self.crop_scale = (settings.object_crop_scale if settings.object_crop_scale is not None else trained) or None
        if settings.object_crop_scale:
            logger.info(
                "Box prompts are decoded on object crops of %g x the box (--object-crop-scale), and automatic masks "
                "refined on them.",
                self.crop_scale,
            )
        elif self.crop_scale:
            logger.info(
                "%s was tuned on object crops (config.json object_crop_scale %g): box prompts are decoded on crops of "
                "that scale and automatic masks refined on them, as in training; --object-crop-scale 0 decodes on the "
                "whole image.",
                model,
                self.crop_scale,
            )
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="sam-hf-serve")
        self.pending = 0
        self.ready = True
        self._generator = None
        self._generator_error: str | None = None
        self._text_prompter = None
        self._text_error: str | None = None
        logger.info("Loaded %s on %s in %.1f s.", model, self.device, time.perf_counter() - start)

    @property
    def device(self) -> str:
        return str(self.predictor.device)

    def close(self) -> None:
        self.ready = False
        self.executor.shutdown(wait=False, cancel_futures=True)

    def mask_generator(self) -> Any:
        """The `mask-generation` pipeline on the loaded model, built on first use (call with the lock held)."""
        if self._generator is None and self._generator_error is None:
            from transformers import pipeline

            try:
                self._generator = pipeline(
                    "mask-generation",
                    model=self.predictor.model,
                    image_processor=self.predictor.processor.image_processor,
                    device=self.predictor.device,
                )
            except Exception as err:  # e.g. torchvision missing; /segment keeps working
                logger.exception("Could not build the mask-generation pipeline.")
                self._generator_error = f"{type(err).__name__}: {err}"
        if self._generator is None:
            raise HTTPException(503, f"Automatic mask generation is unavailable: {self._generator_error}")
        return self._generator

    def text_prompter(self) -> Any:
        """The CLIPSeg `TextPrompter` for `text` requests, built on first use (call with the lock held)."""
        if self._text_prompter is None and self._text_error is None:
            from ...inference.text_prompts import TextPrompter

            try:
                self._text_prompter = TextPrompter.from_pretrained(
                    self.settings.text_model,
                    device=self.predictor.device,
                    max_boxes=min(self.settings.max_prompts, self.settings.max_boxes_and_points),
                )
            except Exception as err:  # e.g. an offline server without the checkpoint; box prompts keep working
                logger.exception("Could not load the text model %s.", self.settings.text_model)
                self._text_error = f"{type(err).__name__}: {err}"
        if self._text_prompter is None:
            raise HTTPException(503, f"Text prompts are unavailable: {self._text_error}")
        return self._text_prompter

    def _padded_pixels(self) -> int:
        return self.predictor.geometry.image_size**2

    def _check_mask_pixels(self, count: int, image: _DecodedImage, what: str) -> None:
        total = count * image.height * image.width
        if total > self.settings.max_mask_pixels:
            raise HTTPException(
                413,
                f"{what} on a {image.width}x{image.height} image make {total:,} mask pixels, more than the server's "
                f"max_mask_pixels = {self.settings.max_mask_pixels:,}. Send fewer prompts or a smaller image.",
            )

    def _check_prompt_work(self, count: int, boxes: np.ndarray | None, points: np.ndarray | None) -> None:
        """Refuse prompts whose decoder work exceeds the limits, before the image is decoded or the lock taken."""
        settings = self.settings
        if count > settings.max_prompts:
            raise HTTPException(
                422,
                f"{count} prompts in one request, more than the server's max_prompts = {settings.max_prompts} "
                "(--max-prompts). Split the prompts over several requests.",
            )
        per_prompt = points.shape[1] if points is not None else 0
        if per_prompt > settings.max_points_per_prompt:
            raise HTTPException(
                422,
                f"{per_prompt} points in one prompt, more than the server's max_points_per_prompt = "
                f"{settings.max_points_per_prompt} (--max-points-per-prompt). Send fewer points per prompt.",
            )
        total = (len(boxes) if boxes is not None else 0) + (points.shape[0] * per_prompt if points is not None else 0)
        if total > settings.max_boxes_and_points:
            raise HTTPException(
                413,
                f"{total} boxes and points in one request, more than the server's max_boxes_and_points = "
                f"{settings.max_boxes_and_points} (--max-boxes-and-points). Split the prompts over several requests.",
            )

    async def run(self, job: Callable[[threading.Event], bytes]) -> bytes:
        """Run `job` in the thread pool, bounded by the request timeout."""
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self.executor, job, cancelled)
        try:
            return await asyncio.wait_for(future, self.settings.request_timeout_s)
        except asyncio.TimeoutError as err:
            cancelled.set()
            logger.warning("A request timed out after %s s.", self.settings.request_timeout_s)
            raise HTTPException(
                504,
                f"The request did not finish within request_timeout_s = {self.settings.request_timeout_s} s; the "
                "server is busy or the input is too large. Retry later, or send fewer prompts or a smaller image.",
            ) from err

    def segment(
        self,
        cancelled: threading.Event,
        data: bytes,
        prompts_text: str,
        mask_format: MaskFormat,
        text: str | None = None,
    ) -> bytes:
        prompts = _parse_prompts(prompts_text)
        image = _DecodedImage(data, self.settings.max_image_pixels)
        if text is not None:
            return self.segment_text(cancelled, image, text, prompts, mask_format)
        try:
            boxes, points, labels = validate_prompts(
                (image.height, image.width), prompts.get("boxes"), prompts.get("points"), prompts.get("point_labels")
            )
        except (ValueError, TypeError, OverflowError, RecursionError) as err:
            raise HTTPException(422, f"Invalid prompts: {err}") from err
        count = len(boxes) if boxes is not None else len(points)
        self._check_prompt_work(count, boxes, points)
        multimask = prompts.get("multimask_output", False)
        per_prompt = 3 if multimask else 1
        self._check_mask_pixels(count * per_prompt, image, f"{count} prompts x {per_prompt} masks")
        previous = _previous_mask(prompts.get("mask_input"), count, image)
        pixels = image.load()
        with self.lock:
            if cancelled.is_set():
                raise _Cancelled
            # Bound the float32 logits up-sampled at once; chunking does not change the masks.
            side = max(image.height * image.width, self._padded_pixels())
            self.predictor.chunk_size = max(1, min(64, _CHUNK_ELEMENTS // (per_prompt * side)))
            # A crop needs a box, and a previous mask is in the whole image's frame.
            cropped = self.crop_scale if boxes is not None and previous is None else None
            predictor = ObjectCropPredictor(self.predictor, cropped) if cropped else self.predictor
            predictor.set_image(pixels)
            mask_input = self.predictor.mask_input_from_mask(previous) if previous is not None else None
            result = predictor.predict(
                boxes=boxes, points=points, point_labels=labels, multimask_output=multimask, mask_input=mask_input
            )
        payload = {
            "width": image.width,
            "height": image.height,
            "mask_format": mask_format,
            "multimask_output": multimask,
            "object_crop_scale": cropped,
            "masks": _encode_masks(result.masks, mask_format),
            "scores": result.scores.tolist(),
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    def segment_text(
        self, cancelled: threading.Event, image: _DecodedImage, text: str, prompts: dict[str, Any], fmt: MaskFormat
    ) -> bytes:
        """Masks for the blobs of CLIPSeg's heat map of `text`, one box prompt each (see
        `sam_hf.inference.text_prompts`)."""
        if any(prompts.get(k) is not None for k in ("boxes", "points", "point_labels", "mask_input")):
            raise HTTPException(422, "Give either `text` or box/point `prompts`, not both.")
        try:
            text = check_text(text)
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        multimask = prompts.get("multimask_output", False)
        per_prompt = 3 if multimask else 1
        pixels = image.load()
        with self.lock:
            if cancelled.is_set():
                raise _Cancelled
            prompter = self.text_prompter()
            _, boxes, peaks = prompter.boxes(pixels, text)
            self._check_mask_pixels(len(boxes) * per_prompt, image, f"{len(boxes)} text boxes x {per_prompt} masks")
            side = max(image.height * image.width, self._padded_pixels())
            self.predictor.chunk_size = max(1, min(64, _CHUNK_ELEMENTS // (per_prompt * side)))
            cropped = self.crop_scale
            predictor = ObjectCropPredictor(self.predictor, cropped) if cropped else self.predictor
            predictor.set_image(pixels)
            masks = np.zeros((0, per_prompt, image.height, image.width), bool)
            scores = np.zeros((0, per_prompt))
            if len(boxes):
                result = predictor.predict(boxes=boxes, multimask_output=multimask)
                masks, scores = result.masks, result.scores
        payload = {
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
        return json.dumps(payload, separators=(",", ":")).encode()

    def segment_auto(
        self,
        cancelled: threading.Event,
        data: bytes,
        mask_format: MaskFormat,
        points_per_side: int,
        pipeline_kwargs: dict[str, float],
    ) -> bytes:
        image = _DecodedImage(data, self.settings.max_image_pixels)
        self._check_mask_pixels(
            3 * points_per_side**2, image, f"Up to 3 x {points_per_side}^2 masks for points_per_side={points_per_side}"
        )
        pixels = image.load()
        side = max(image.height * image.width, self._padded_pixels())
        with self.lock:
            if cancelled.is_set():
                raise _Cancelled
            generator = self.mask_generator()
            outputs = generator(
                Image.fromarray(pixels),
                points_per_crop=points_per_side,
                points_per_batch=max(1, min(64, _CHUNK_ELEMENTS // (3 * side))),
                **pipeline_kwargs,
            )
            masks = [np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m, dtype=bool) for m in outputs["masks"]]
            scores = outputs["scores"]
            scores = scores.cpu().float().tolist() if isinstance(scores, torch.Tensor) else [float(s) for s in scores]
            cropped = self.crop_scale
            if cropped:
                self.predictor.chunk_size = max(1, min(64, _CHUNK_ELEMENTS // side))
                refined, refined_scores = refine_on_object_crops(
                    self.predictor, pixels, masks, cropped, pipeline_kwargs.get("crops_nms_thresh", 0.7)
                )
                masks, scores = list(refined), refined_scores.tolist()
        payload = {
            "width": image.width,
            "height": image.height,
            "mask_format": mask_format,
            "points_per_side": points_per_side,
            "object_crop_scale": cropped,
            "masks": [_encode_masks(m, mask_format) for m in masks],
            "scores": scores,
        }
        return json.dumps(payload, separators=(",", ":")).encode()

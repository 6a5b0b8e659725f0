"""The server's settings and limits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import HTTPException, Query

from ...core.windows import check_crop_scale
from ...inference.text_prompts import DEFAULT_TEXT_MODEL

#: Image formats the server decodes. Others (EPS, which Pillow hands to Ghostscript, PSD, ...) are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")


#: Keys accepted in the `prompts` JSON object.
PROMPT_KEYS = ("boxes", "points", "point_labels", "multimask_output", "mask_input")


#: Float32 elements of up-sampled mask logits held at once while post-processing (128 MB); bounds the chunk size.
_CHUNK_ELEMENTS = 2**25


#: Largest non-file multipart field (the `prompts` JSON); starlette's default, set explicitly where it can be.
_MAX_FIELD_BYTES = 1024 * 1024


MaskFormat = Literal["rle", "png"]


_MaskFormatQuery = Annotated[
    MaskFormat | None, Query(description="`rle` (COCO RLE, the default) or `png` (base64 PNG); or a form field.")
]


@dataclass
class ServeSettings:
    """Limits and options of the HTTP server. Every limit answers a request that exceeds it with a 4xx.

    Args:
        max_upload_bytes (`int`, *optional*, defaults to 20 MiB): largest request body (image, prompts and
            multipart overhead), checked against `Content-Length` and against the bytes actually received; 413 above.
        max_image_pixels (`int`, *optional*, defaults to 40,000,000): largest `width * height` of an image, checked
            from the image header before decoding; 413 above. `PIL.Image.MAX_IMAGE_PIXELS` is set to the same value
            while the server runs, so Pillow's decompression-bomb guard agrees with it.
        max_prompts (`int`, *optional*, defaults to 256): most prompts (boxes or point sets) per `/segment` request;
            422 above.
        max_points_per_prompt (`int`, *optional*, defaults to 64): most points in one prompt of `/segment`; 422
            above. Every point is a token the prompt encoder and the mask decoder attend over, so one prompt with
            tens of thousands of points holds the model for as long as thousands of ordinary requests.
        max_boxes_and_points (`int`, *optional*, defaults to 2048): most boxes plus points in one `/segment`
            request, all prompts together (the request's decoder work); 413 above.
        max_mask_pixels (`int`, *optional*, defaults to 256 Mi): most mask pixels one response may hold,
            `prompts x masks per prompt x height x width` for `/segment` and the worst case
            `3 x points_per_side**2 x height x width` for `/segment/auto`; 413 above. Bounds the server's memory.
        max_auto_points (`int`, *optional*, defaults to 32): largest `points_per_side` of `/segment/auto` (the
            pipeline's `points_per_crop`); 422 above.
        request_timeout_s (`float`, *optional*, defaults to 60.0): seconds a request may spend decoding, waiting for
            the model and running it; 504 after that. A model call that already started finishes in the background
            and its result is dropped; one that has not started is skipped.
        max_pending (`int`, *optional*, defaults to 64): requests to the model endpoints in flight at once; 503 with
            `Retry-After` above. Memory while queued is about `max_pending x max_upload_bytes`.
        workers (`int`, *optional*, defaults to 4): threads that decode images and encode masks; model calls are
            serialised by a lock whatever the number.
        device (`str`, *optional*): where the model runs; `"cuda"` if available, else `"cpu"`.
        text_model (`str`, *optional*, defaults to `"CIDAS/clipseg-rd64-refined"`): the CLIPSeg checkpoint that turns
            the `text` field of `/segment` into box prompts (see `sam_hf.inference.text_prompts`); loaded on first use.
        object_crop_scale (`float`, *optional*): decode each box prompt of `/segment` on its own square crop, this
            many times the box's longer side (`sam_hf.inference.ObjectCropPredictor`), and decode each mask of
            `/segment/auto` again the same way (`sam_hf.inference.refine_on_object_crops`). Defaults to the scale the
            model was tuned with (`object_crop_scale` in its `config.json`, none for most models); 0 turns it off.
            Prompts without a box, and prompts with a `mask_input`, are decoded on the whole image.
    """

    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompts: int = 256
    max_points_per_prompt: int = 64
    max_boxes_and_points: int = 2048
    max_mask_pixels: int = 256 * 1024 * 1024
    max_auto_points: int = 32
    request_timeout_s: float = 60.0
    max_pending: int = 64
    workers: int = 4
    device: str | None = None
    text_model: str = DEFAULT_TEXT_MODEL
    object_crop_scale: float | None = None

    def __post_init__(self) -> None:
        if self.object_crop_scale is not None:
            check_crop_scale(self.object_crop_scale, "ServeSettings.object_crop_scale", off=True)
        for name in _INTEGER_LIMITS:
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():  # e.g. max_image_pixels=40e6
                value = int(value)
                setattr(self, name, value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeSettings.{name} must be a positive integer, got {value!r}.")
        timeout = self.request_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"ServeSettings.request_timeout_s must be a positive number of seconds, got {timeout!r}.")


_INTEGER_LIMITS = (
    "max_upload_bytes",
    "max_image_pixels",
    "max_prompts",
    "max_points_per_prompt",
    "max_boxes_and_points",
    "max_mask_pixels",
    "max_auto_points",
    "max_pending",
    "workers",
)


def _check_prompt_work(
    settings: ServeSettings, count: int, boxes: np.ndarray | None, points: np.ndarray | None
) -> None:
    """Refuse prompts whose decoder work exceeds the limits, before the image is decoded or the lock taken."""
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


def _check_mask_pixels(settings: ServeSettings, count: int, width: int, height: int, what: str) -> None:
    """Refuse an answer of `count` masks of a `width x height` image over `max_mask_pixels` (413)."""
    total = count * height * width
    if total > settings.max_mask_pixels:
        raise HTTPException(
            413,
            f"{what} on a {width}x{height} image make {total:,} mask pixels, more than the server's "
            f"max_mask_pixels = {settings.max_mask_pixels:,}. Send fewer prompts or a smaller image.",
        )

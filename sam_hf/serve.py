"""Serve a SAM checkpoint over HTTP: prompted masks, automatic masks, and limits that keep bad input out.

```python
import uvicorn
from sam_hf.serve import ServeSettings, create_app

app = create_app("runs/demo", settings=ServeSettings(max_prompts=64))
uvicorn.run(app, host="127.0.0.1", port=8000)
```

or from the shell: `sam-hf serve --model runs/demo`. Endpoints:

- `GET /health`: `{"model", "device", "ready"}`.
- `POST /segment`: multipart with an `image` file part and a `prompts` JSON part
  (`{"boxes": [[x0, y0, x1, y1], ...], "points": [[[x, y], ...], ...], "point_labels": [[1, 0], ...],
  "multimask_output": false}`); per-prompt masks as COCO RLE or base64 PNG (`mask_format`), with scores.
- `POST /segment/auto`: automatic masks from the transformers `mask-generation` pipeline on a grid of
  `points_per_side` x `points_per_side` points.

A model tuned on object crops (`object_crop_scale` in its `config.json`) decodes each box prompt on its own crop, and
refines each automatic mask on one, as in training (`ServeSettings.object_crop_scale`); answers say which scale was
used (`"object_crop_scale"`, `null` for the whole image).

Every model call runs in a worker thread under one lock, so the event loop stays free and concurrent requests
never share the predictor's image state. Bad input gets a 4xx JSON `{"detail": "..."}` that says what was wrong.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from struct import error as StructError
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import FormData, UploadFile

from .data import to_rgb_array
from .inference import SamPredictor, default_device, validate_prompts
from .text_prompts import DEFAULT_TEXT_MODEL, check_text
from .tiling import ObjectCropPredictor, check_crop_scale, refine_on_object_crops

logger = logging.getLogger(__name__)

__all__ = ["ServeSettings", "create_app", "decode_png_mask", "decode_rle", "encode_png_mask", "encode_rle"]

#: Image formats the server decodes. Others (EPS, which Pillow hands to Ghostscript, PSD, ...) are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")
#: Keys accepted in the `prompts` JSON object.
PROMPT_KEYS = ("boxes", "points", "point_labels", "multimask_output", "mask_input")
#: Float32 elements of up-sampled mask logits held at once while post-processing (128 MB); bounds the chunk size.
_CHUNK_ELEMENTS = 2**25
#: Largest non-file multipart field (the `prompts` JSON); starlette's default, set explicitly where it can be.
_MAX_FIELD_BYTES = 1024 * 1024
# `Request.form(max_part_size=...)` exists from starlette 0.44 on.
_FORM_TAKES_PART_SIZE = "max_part_size" in inspect.signature(Request.form).parameters

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
            the `text` field of `/segment` into box prompts (see `sam_hf.text_prompts`); loaded on first use.
        object_crop_scale (`float`, *optional*): decode each box prompt of `/segment` on its own square crop, this
            many times the box's longer side (`sam_hf.tiling.ObjectCropPredictor`), and decode each mask of
            `/segment/auto` again the same way (`sam_hf.tiling.refine_on_object_crops`). Defaults to the scale the
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


# ---------------------------------------------------------------------------------------------------------------
# Mask encodings
# ---------------------------------------------------------------------------------------------------------------


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a 2-D binary mask as uncompressed COCO RLE, as `pycocotools` reads it.

    Runs are counted over the mask in column-major (Fortran) order and alternate background / foreground, starting
    with background, so a mask whose first pixel is set starts with a run of 0.

    Args:
        mask (`np.ndarray`): `(H, W)` mask; non-zero is foreground.

    Returns:
        `{"size": [H, W], "counts": [int, ...]}`.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"Expected a 2-D (H, W) mask, got shape {mask.shape}.")
    height, width = mask.shape
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [height, width], "counts": []}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [height, width], "counts": counts.tolist()}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode uncompressed COCO RLE (see `encode_rle`) into an `(H, W)` bool mask.

    Args:
        rle (`dict`): `{"size": [H, W], "counts": [int, ...]}`.
    """
    height, width = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(
            f"RLE counts must be non-negative and sum to height * width = {height * width}, got {counts.sum()}."
        )
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")


def encode_png_mask(mask: np.ndarray) -> str:
    """Encode a 2-D binary mask as a base64 1-bit PNG (black background, white foreground)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png_mask(data: str) -> np.ndarray:
    """Decode a base64 PNG mask (see `encode_png_mask`) into an `(H, W)` bool mask."""
    with Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=["PNG"]) as image:
        return np.asarray(image.convert("L")) > 0


def _encode_masks(masks: np.ndarray, mask_format: MaskFormat) -> list:
    """Encode `(..., H, W)` masks, keeping the leading dimensions as nested lists."""
    encode = encode_rle if mask_format == "rle" else encode_png_mask
    if masks.ndim == 2:
        return encode(masks)
    return [_encode_masks(m, mask_format) for m in masks]


# ---------------------------------------------------------------------------------------------------------------
# Request parsing (all raise HTTPException with a message for the client)
# ---------------------------------------------------------------------------------------------------------------

_FORMATS_TEXT = ", ".join(IMAGE_FORMATS)
# `warnings.catch_warnings` changes process-wide state; one decode at a time keeps the save/restore pairs nested.
_PIL_GUARD = threading.Lock()


class _DecodedImage:
    """An uploaded image: its size from the header at once, its pixels on `load()`; errors become 400 or 413."""

    def __init__(self, data: bytes, max_pixels: int):
        if not data:
            raise HTTPException(400, f"The `image` part is empty; expected the bytes of an image ({_FORMATS_TEXT}).")
        self.data = data
        self.max_pixels = max_pixels
        self.width, self.height = self._decode(load=False)

    def load(self) -> np.ndarray:
        """`(H, W, 3)` uint8 pixels."""
        return self._decode(load=True)

    def _decode(self, load: bool) -> Any:
        with _PIL_GUARD, warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both are refusals here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(self.data), formats=IMAGE_FORMATS) as image:
                    width, height = image.size
                    if width * height > self.max_pixels:
                        raise HTTPException(
                            413,
                            f"The image is {width}x{height} = {width * height:,} pixels, more than the server's "
                            f"max_image_pixels = {self.max_pixels:,}. Send a smaller image.",
                        )
                    if not load:
                        return width, height
                    image.load()
                    return to_rgb_array(image)
            except HTTPException:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise HTTPException(
                    413, f"The image exceeds the server's max_image_pixels = {self.max_pixels:,}: {err}"
                ) from err
            except UnidentifiedImageError as err:
                raise HTTPException(
                    400, f"The `image` part is not an image the server reads; expected one of {_FORMATS_TEXT}."
                ) from err
            except (OSError, SyntaxError, ValueError, EOFError, StructError) as err:
                raise HTTPException(400, f"The image could not be decoded (truncated or corrupt?): {err}") from err


def _parse_prompts(text: str) -> dict[str, Any]:
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError as err:
        raise HTTPException(
            400, f"`prompts` is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})."
        ) from err
    except RecursionError as err:
        raise HTTPException(400, "`prompts` JSON is nested too deeply.") from err
    if not isinstance(prompts, dict):
        raise HTTPException(
            422, f"`prompts` must be a JSON object with keys {', '.join(PROMPT_KEYS)}; got {type(prompts).__name__}."
        )
    unknown = sorted(set(prompts) - set(PROMPT_KEYS))
    if unknown:
        raise HTTPException(422, f"Unknown key(s) in `prompts`: {unknown}; expected only {list(PROMPT_KEYS)}.")
    multimask = prompts.get("multimask_output", False)
    if not isinstance(multimask, bool):
        raise HTTPException(422, f"`multimask_output` must be true or false, got {multimask!r}.")
    for key in ("boxes", "points", "point_labels"):
        if prompts.get(key) == []:  # an empty list means "none of these"
            prompts[key] = None
    return prompts


def _previous_mask(value: Any, count: int, image: _DecodedImage) -> np.ndarray | None:
    """The `mask_input` of `prompts`: an earlier mask of this image in either response format (an RLE object, or
    a base64 PNG string), for the one prompt it refines."""
    if value is None:
        return None
    if count != 1:
        raise HTTPException(
            422, f"`mask_input` refines one object: give it with one prompt, got {count} prompts in the request."
        )
    expected = (image.height, image.width)
    try:
        if isinstance(value, dict):
            # The size is checked before anything is decoded, so a large mask costs nothing.
            size = tuple(int(v) for v in value["size"])
            mask = decode_rle(value) if size == expected else None
        else:
            with Image.open(io.BytesIO(base64.b64decode(value, validate=True)), formats=["PNG"]) as png:
                size = png.size[::-1]
                mask = np.asarray(png.convert("L")) > 0 if size == expected else None
    except (ValueError, TypeError, KeyError, OSError) as err:
        raise HTTPException(
            422, f"`mask_input` must be a mask as /segment returns it (an RLE object or a base64 PNG): {err}"
        ) from err
    if mask is None:
        raise HTTPException(
            422,
            f"`mask_input` is {size[1]}x{size[0]} but the image is {image.width}x{image.height}; give a mask of the "
            "same image.",
        )
    return mask


async def _read_body(request: Request, settings: ServeSettings) -> bytes:
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HTTPException(400, f"Content-Length must be a number of bytes, got {declared!r}.")
        if int(declared) > limit:
            raise HTTPException(
                413, f"The request body is {int(declared):,} bytes, more than max_upload_bytes = {limit:,}."
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"The request body exceeds max_upload_bytes = {limit:,} bytes.")
    return bytes(body)


async def _read_form(request: Request, settings: ServeSettings, expected: str) -> FormData:
    """The multipart form of `request`, with the body size limit applied while it is received."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise HTTPException(
            415, f"Expected a multipart/form-data body with {expected}, got Content-Type {content_type or 'none'!r}."
        )
    body = await _read_body(request, settings)
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent, body
        if sent:
            return {"type": "http.disconnect"}
        sent, data, body = True, body, b""
        return {"type": "http.request", "body": data, "more_body": False}

    limits = {"max_files": 2, "max_fields": 8}
    if _FORM_TAKES_PART_SIZE:
        limits["max_part_size"] = _MAX_FIELD_BYTES
    try:
        return await Request(request.scope, replay).form(**limits)
    except ValueError as err:  # python-multipart's parse errors, if starlette lets one through
        raise HTTPException(400, f"The multipart body could not be parsed: {err}") from err


async def _file_part(form: FormData, name: str, example: str) -> bytes:
    part = form.get(name)
    if part is None:
        raise HTTPException(422, f"Missing the `{name}` part; send it as a file, e.g. `curl -F {name}=@{example}`.")
    if not isinstance(part, UploadFile):
        raise HTTPException(
            422, f"`{name}` must be a file part (with a filename), e.g. `curl -F {name}=@{example}`, not a text field."
        )
    return await part.read()


async def _text_part(form: FormData, name: str, example: str) -> str:
    part = form.get(name)
    if part is None:
        raise HTTPException(422, f"Missing the `{name}` part; expected JSON such as {example}.")
    if isinstance(part, UploadFile):
        data = await part.read()
        if len(data) > _MAX_FIELD_BYTES:
            raise HTTPException(413, f"The `{name}` part is larger than {_MAX_FIELD_BYTES:,} bytes.")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise HTTPException(400, f"The `{name}` part is not UTF-8 text: {err}") from err
    return part


def _mask_format(query: MaskFormat | None, form: FormData) -> MaskFormat:
    value = form.get("mask_format")
    if value is None:
        return query or "rle"
    if value not in ("rle", "png") or isinstance(value, UploadFile):
        raise HTTPException(422, f"`mask_format` must be 'rle' or 'png', got {value!r}.")
    if query is not None and query != value:
        raise HTTPException(422, f"`mask_format` is {query!r} in the query but {value!r} in the form; give it once.")
    return value


# ---------------------------------------------------------------------------------------------------------------
# The model service: one predictor, one lock, one thread pool
# ---------------------------------------------------------------------------------------------------------------


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
            from .text_prompts import TextPrompter

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
        """Masks for the blobs of CLIPSeg's heat map of `text`, one box prompt each (see `sam_hf.text_prompts`)."""
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


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------

_PROMPTS_EXAMPLE = '{"boxes": [[10, 20, 110, 140]]}'
_MULTIPART_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": f"One of {_FORMATS_TEXT}."},
                        "prompts": {
                            "type": "string",
                            "description": "JSON object with `boxes` (N x 4 xyxy pixels), `points` (N x P x 2 xy "
                            "pixels), `point_labels` (N x P, 1 positive / 0 negative) and `multimask_output` "
                            "(bool). Required by /segment unless `text` is given.",
                            "example": _PROMPTS_EXAMPLE,
                        },
                        "text": {
                            "type": "string",
                            "description": "/segment only, instead of box/point prompts: a phrase such as "
                            "`nucleus`; CLIPSeg's heat map gives one box per blob, SAM a mask per box. The answer "
                            "also has the `boxes` and each blob's peak heat (`text_peaks`).",
                        },
                        "mask_format": {"type": "string", "enum": ["rle", "png"]},
                    },
                }
            }
        },
    }
}


def _flatten_validation_error(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" + (f" (got {e['input']!r})" if "input" in e else ""))
    return "; ".join(parts) or "Invalid request."


def create_app(model: str | os.PathLike, *, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving the SAM checkpoint `model`, loaded once when the app starts.

    Args:
        model (`str` or `os.PathLike`): a directory written by `save_pretrained` (model and processor) or a Hub id.
        settings (`ServeSettings`, *optional*): limits and device; the defaults of `ServeSettings` otherwise.

    Returns:
        `fastapi.FastAPI`: run it with uvicorn, e.g. `uvicorn.run(app, host="127.0.0.1", port=8000)`.

    While the app runs, `PIL.Image.MAX_IMAGE_PIXELS` is set to `settings.max_image_pixels` (restored at shutdown),
    so Pillow's decompression-bomb check uses the server's limit.
    """
    settings = settings or ServeSettings()
    model = os.fspath(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        previous_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        service = _ModelService(model, settings)
        app.state.service = service
        try:
            yield
        finally:
            service.close()
            Image.MAX_IMAGE_PIXELS = previous_limit

    app = FastAPI(
        title="sam_hf",
        summary="Segment Anything (SAM) masks from box and point prompts, and automatic masks.",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _flatten_validation_error(err)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
        logger.error("Unhandled %s on %s %s: %s", type(err).__name__, request.method, request.url.path, err)
        return JSONResponse({"detail": "Internal server error; the server log has the details."}, status_code=500)

    def service_of(request: Request) -> _ModelService:
        service: _ModelService | None = getattr(request.app.state, "service", None)
        if service is None or not service.ready:
            raise HTTPException(503, "The model is not loaded yet or the server is shutting down.")
        return service

    async def guarded(request: Request, handler: Callable[[_ModelService], Any]) -> Response:
        service = service_of(request)
        if service.pending >= settings.max_pending:
            raise HTTPException(
                503,
                f"The server already has max_pending = {settings.max_pending} requests in flight; retry shortly.",
                headers={"Retry-After": "1"},
            )
        service.pending += 1
        try:
            content = await handler(service)
        finally:
            service.pending -= 1
        return Response(content=content, media_type="application/json")

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """The model id, its device, and whether the model is loaded and serving."""
        service: _ModelService | None = getattr(request.app.state, "service", None)
        ready = service is not None and service.ready
        body = {"model": model, "device": service.device if service else None, "ready": ready}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.post("/segment", openapi_extra=_MULTIPART_DOC)
    async def segment(
        request: Request,
        mask_format: _MaskFormatQuery = None,
    ) -> Response:
        """Masks for each box and/or point prompt, or for a `text` prompt; all prompts share one image encoding.

        Returns `{"width", "height", "mask_format", "multimask_output", "masks", "scores"}`, where `masks[i][j]` is
        mask `j` of prompt `i` (1 mask per prompt, or 3 with `multimask_output`) and `scores[i][j]` its predicted IoU.
        """

        async def handle(service: _ModelService) -> bytes:
            form = await _read_form(request, settings, "an `image` file part and a `prompts` JSON part")
            try:
                fmt = _mask_format(mask_format, form)
                data = await _file_part(form, "image", "cells.png")
                text = await _text_part(form, "text", '"nucleus"') if "text" in form else None
                prompts = (
                    await _text_part(form, "prompts", _PROMPTS_EXAMPLE) if text is None or "prompts" in form else "{}"
                )
            finally:
                await form.close()
            return await service.run(lambda cancelled: service.segment(cancelled, data, prompts, fmt, text))

        return await guarded(request, handle)

    @app.post("/segment/auto", openapi_extra=_MULTIPART_DOC)
    async def segment_auto(
        request: Request,
        mask_format: _MaskFormatQuery = None,
        points_per_side: Annotated[
            int | None,
            Query(
                ge=1, description="A grid of points_per_side^2 point prompts; at most the server's max_auto_points."
            ),
        ] = None,
        pred_iou_thresh: Annotated[
            float, Query(ge=0.0, le=1.0, description="Keep masks whose predicted IoU is above this.")
        ] = 0.88,
        stability_score_thresh: Annotated[
            float, Query(ge=0.0, le=1.0, description="Keep masks whose stability score is above this.")
        ] = 0.95,
        crops_nms_thresh: Annotated[
            float, Query(gt=0.0, le=1.0, description="Box IoU above which a lower-scoring duplicate is dropped.")
        ] = 0.7,
    ) -> Response:
        """Automatic masks from SAM on a grid of points (transformers' `mask-generation` pipeline).

        Returns `{"width", "height", "mask_format", "points_per_side", "masks", "scores"}` with one mask per object
        found, after the pipeline's score, stability and non-maximum-suppression filters.
        """
        points = points_per_side if points_per_side is not None else min(32, settings.max_auto_points)
        if points > settings.max_auto_points:
            raise HTTPException(
                422,
                f"points_per_side = {points} is more than the server's max_auto_points = {settings.max_auto_points}.",
            )
        pipeline_kwargs = {
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "crops_nms_thresh": crops_nms_thresh,
        }

        async def handle(service: _ModelService) -> bytes:
            form = await _read_form(request, settings, "an `image` file part")
            try:
                fmt = _mask_format(mask_format, form)
                data = await _file_part(form, "image", "cells.png")
            finally:
                await form.close()
            return await service.run(
                lambda cancelled: service.segment_auto(cancelled, data, fmt, points, pipeline_kwargs)
            )

        return await guarded(request, handle)

    return app

"""Reading requests: bodies, forms, images, prompts and mask inputs."""

from __future__ import annotations

import base64
import inspect
import io
import json
import threading
import warnings
from struct import error as StructError
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import FormData, UploadFile

from ...core.images import to_rgb_array
from .settings import _MAX_FIELD_BYTES, IMAGE_FORMATS, PROMPT_KEYS, MaskFormat, ServeSettings

# `Request.form(max_part_size=...)` exists from starlette 0.44 on.
_FORM_TAKES_PART_SIZE = "max_part_size" in inspect.signature(Request.form).parameters


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

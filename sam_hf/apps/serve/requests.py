"""Reading requests: the body limit, forms, images, prompts and mask inputs; writing masks."""

from __future__ import annotations

import base64
import inspect
import io
import json
from collections.abc import Callable
from struct import error as StructError
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...core.images import (
    AspectRatioError,
    ImageTooLargeError,
    UnreadableImageError,
    check_aspect_ratio,
    read_image_header,
    read_rgb,
)
from ...core.rle import decode_rle, encode_rle, rle_size
from .settings import _MAX_FIELD_BYTES, IMAGE_FORMATS, PROMPT_KEYS, MaskFormat

__all__ = ["decode_png_mask", "decode_rle", "encode_png_mask", "encode_rle"]

# `Request.form(max_part_size=...)` exists from starlette 0.44 on.
_FORM_TAKES_PART_SIZE = "max_part_size" in inspect.signature(Request.form).parameters


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
    if masks.ndim == 2:
        return encode_rle(masks, compressed=False) if mask_format == "rle" else encode_png_mask(masks)
    return [_encode_masks(m, mask_format) for m in masks]


def _json_body(payload: dict[str, Any]) -> bytes:
    """An answer's JSON, compact (masks make most of it)."""
    return json.dumps(payload, separators=(",", ":")).encode()


_FORMATS_TEXT = ", ".join(IMAGE_FORMATS)


class _DecodedImage:
    """An uploaded image: its size from the header at once, its pixels on `load()`, both as displayed (EXIF
    orientation applied, as `sam_hf.core.images` reads every image); errors become 400, 413 or 422.

    Args:
        data (`bytes`): the `image` part.
        max_pixels (`int`): the server's `max_image_pixels`; 413 above, checked from the header.
        longest_edge (`int`, *optional*): the side the model's processor resizes the longest image side to
            (`sam_hf.core.images.processor_longest_edge`); an image whose short side would round to 0 px gets a 422
            naming the largest aspect ratio the model takes.
    """

    def __init__(self, data: bytes, max_pixels: int, longest_edge: int | None = None):
        if not data:
            raise HTTPException(400, f"The `image` part is empty; expected the bytes of an image ({_FORMATS_TEXT}).")
        self.data = data
        self.max_pixels = max_pixels
        header = self._read(read_image_header)
        self.width, self.height = header.width, header.height
        try:
            check_aspect_ratio(self.height, self.width, longest_edge, "the image")
        except AspectRatioError as err:
            raise HTTPException(422, str(err)) from err

    def load(self) -> np.ndarray:
        """`(H, W, 3)` uint8 pixels."""
        pixels = self._read(read_rgb)
        if pixels.shape[:2] != (self.height, self.width):  # e.g. an EXIF orientation stored after the pixel data
            raise HTTPException(
                400,
                f"The image header says {self.width}x{self.height} but its pixels are {pixels.shape[1]}x"
                f"{pixels.shape[0]} (as displayed); send the image with its orientation applied.",
            )
        return pixels

    def _read(self, read: Callable[..., Any]) -> Any:
        """`read` (`read_image_header` or `read_rgb` of `sam_hf.core.images`) on the bytes, errors as HTTP answers."""
        try:
            return read(self.data, "the `image` part", formats=IMAGE_FORMATS, max_pixels=self.max_pixels)
        except ImageTooLargeError as err:
            raise HTTPException(
                413,
                f"The image exceeds the server's max_image_pixels = {self.max_pixels:,}: {err.__cause__ or err} Send "
                "a smaller image.",
            ) from err
        except UnreadableImageError as err:
            if isinstance(err.__cause__, UnidentifiedImageError):
                raise HTTPException(
                    400, f"The `image` part is not an image the server reads; expected one of {_FORMATS_TEXT}."
                ) from err
            raise HTTPException(
                400, f"The image could not be decoded (truncated or corrupt?): {err.__cause__ or err}"
            ) from err
        except ValueError as err:  # pixels the model cannot use, e.g. NaN in a float TIFF
            raise HTTPException(422, str(err)) from err


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
        elif prompts.get(key) is not None:
            _check_numbers(prompts[key], key)
    return prompts


def _check_numbers(value: Any, key: str) -> None:
    """Refuse a prompt array holding anything but JSON numbers (numpy would read `"1"` and `true` as 1.0)."""
    stack = [value]
    while stack:  # a loop, not recursion: the JSON may be nested as deeply as the parser allows
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, int | float):
            shown = json.dumps(item)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise HTTPException(
                422, f"`{key}` must hold only numbers (nested lists of JSON numbers); it holds {shown}."
            )


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
        # The size is checked before anything is decoded, so a large mask costs nothing.
        if isinstance(value, dict):
            size = rle_size(value)
            mask = decode_rle(value) if size == expected else None
        elif isinstance(value, str):
            with Image.open(io.BytesIO(base64.b64decode(value, validate=True)), formats=["PNG"]) as png:
                size = png.size[::-1]
                mask = np.asarray(png.convert("L")) > 0 if size == expected else None
        else:
            raise TypeError(f"got a JSON {type(value).__name__}")
    except (
        ValueError,
        TypeError,
        OSError,
        SyntaxError,
        EOFError,
        StructError,
        Image.DecompressionBombError,
    ) as err:
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


class _UploadLimit:
    """ASGI middleware that holds every request body to `max_upload_bytes`: 400 for a Content-Length that is not a
    number, 413 for one over the limit before a byte is read, and 413 as soon as the bytes received (a chunked body,
    or one longer than it said) pass the limit.

    It checks the body where the app reads it (the ASGI `receive` channel), so `Request.form()` parses the multipart
    body as it arrives and never holds more than the limit.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int):
        self.app = app
        self.limit = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, received, started = self.limit, 0, False

        async def limited() -> Message:
            nonlocal received, started
            if not started:  # on the first read of the body: endpoints that read none never answer 413
                started = True
                declared = Headers(scope=scope).get("content-length")
                if declared is not None and not declared.strip().isdigit():
                    raise HTTPException(400, f"Content-Length must be a number of bytes, got {declared!r}.")
                if declared is not None and int(declared) > limit:
                    raise HTTPException(
                        413, f"The request body is {int(declared):,} bytes, more than max_upload_bytes = {limit:,}."
                    )
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"The request body exceeds max_upload_bytes = {limit:,} bytes.")
            return message

        await self.app(scope, limited, send)


async def _read_form(request: Request, expected: str) -> FormData:
    """The multipart form of `request`, parsed as it is received (`_UploadLimit` holds the body to the limit)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise HTTPException(
            415, f"Expected a multipart/form-data body with {expected}, got Content-Type {content_type or 'none'!r}."
        )
    limits: dict[str, int] = {"max_files": 2, "max_fields": 8}
    if _FORM_TAKES_PART_SIZE:
        limits["max_part_size"] = _MAX_FIELD_BYTES
    try:
        return await request.form(**limits)
    except StarletteHTTPException as err:
        if type(err) is not StarletteHTTPException:  # ours (the body limit), already worded
            raise
        # Starlette's answer to a malformed body (400), e.g. "Missing boundary in multipart."
        raise HTTPException(err.status_code, f"The multipart body could not be parsed: {err.detail}") from err
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

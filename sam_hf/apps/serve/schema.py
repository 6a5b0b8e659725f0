"""The OpenAPI description of the server: its multipart bodies and every answer it gives, errors included.

The endpoints write their JSON themselves (masks are most of it, and pydantic would only copy them), so these models
document the answers without validating them; `tests/apps/test_serve_schema.py` checks the answers against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from .settings import IMAGE_FORMATS

_PROMPTS_EXAMPLE = '{"boxes": [[10, 20, 110, 140]]}'


class ErrorAnswer(BaseModel):
    """Every 4xx and 5xx answer: what was wrong, naming the part, field or limit and what was expected."""

    detail: str = Field(description="What was wrong and what was expected, e.g. the limit that was crossed.")


class RleMask(BaseModel):
    """A mask as uncompressed COCO RLE, as `pycocotools.mask.frPyObjects` reads it."""

    size: list[int] = Field(min_length=2, max_length=2, description="`[height, width]` of the image.")
    counts: list[int] = Field(
        description="Lengths of alternating background and foreground runs over the mask in column-major order, "
        "starting with background (a mask whose first pixel is set starts with 0); they sum to height x width."
    )


#: A mask as `mask_format` asks: an RLE object, or a base64 1-bit PNG (white foreground).
Mask = RleMask | str


class Health(BaseModel):
    """`GET /health`: 200 while the model is loaded and serving, 503 before and during shutdown."""

    model: str = Field(description="The model directory or Hub id the server was started with.")
    device: str | None = Field(description="Where the model runs, e.g. `cpu` or `cuda:0`; null before it is loaded.")
    ready: bool


class SegmentAnswer(BaseModel):
    """`POST /segment`: one list of masks per prompt (or per box found for `text`), with their predicted IoU."""

    width: int
    height: int
    mask_format: Literal["rle", "png"]
    multimask_output: bool
    object_crop_scale: float | None = Field(
        description="The object-crop scale the box prompts were decoded at; null for the whole image."
    )
    masks: list[list[Mask]] = Field(description="`masks[i][j]`: mask `j` of prompt `i` (1, or 3 with multimask).")
    scores: list[list[float]] = Field(description="`scores[i][j]`: the predicted IoU of `masks[i][j]`.")
    text: str | None = Field(None, description="Only for a `text` request: the phrase, stripped.")
    boxes: list[list[float]] | None = Field(None, description="Only for `text`: the xyxy box of each blob found.")
    text_peaks: list[float] | None = Field(None, description="Only for `text`: each blob's peak heat.")


class AutoAnswer(BaseModel):
    """`POST /segment/auto`: one mask per object found, after the pipeline's filters."""

    width: int
    height: int
    mask_format: Literal["rle", "png"]
    points_per_side: int
    object_crop_scale: float | None = Field(
        description="The object-crop scale each mask was refined at; null for none."
    )
    masks: list[Mask]
    scores: list[float]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorAnswer, "description": _ERRORS[status]} for status in statuses}


_ERRORS = {
    400: "The image is not an image or is corrupt, `prompts` is not valid JSON, or the multipart body is malformed.",
    413: "The body, the image, the prompts or the masks of the answer exceed one of the server's limits.",
    415: "The body is not `multipart/form-data`.",
    422: "A part is missing, a prompt or `mask_input` is invalid, or an option is out of range.",
    503: "The model is not loaded, too many requests are in flight (see `Retry-After`), or a lazily loaded part "
    "(the mask-generation pipeline, the text model) is unavailable.",
    504: "The request did not finish within the server's `request_timeout_s`.",
}

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait, when too many requests are in flight.", "schema": {}}}

HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Health, "description": "The model is loaded and serving."},
    503: {"model": Health, "description": "The model is not loaded yet, or the server is shutting down."},
}

SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": SegmentAnswer, "description": "Masks and scores per prompt."},
    **_errors(400, 413, 415, 422, 503, 504),
}
SEGMENT_RESPONSES[503]["headers"] = _RETRY_AFTER

AUTO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": AutoAnswer, "description": "The automatic masks and their scores."},
    **_errors(400, 413, 415, 422, 503, 504),
}
AUTO_RESPONSES[503]["headers"] = _RETRY_AFTER

_IMAGE = {"type": "string", "format": "binary", "description": f"The image file: one of {', '.join(IMAGE_FORMATS)}."}
_MASK_FORMAT = {
    "type": "string",
    "enum": ["rle", "png"],
    "description": "`rle` (the default) or `png`; also a query parameter (give it once).",
}


def _multipart(properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "required": ["image"], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


SEGMENT_BODY = _multipart(
    {
        "image": _IMAGE,
        "prompts": {
            "type": "string",
            "description": "JSON object with `boxes` (N x 4 xyxy pixels), `points` (N x P x 2 xy pixels), "
            "`point_labels` (N x P, 1 positive / 0 negative), `multimask_output` (bool) and `mask_input` (an earlier "
            "mask of the one prompt, as this endpoint returns it). Required unless `text` is given.",
            "example": _PROMPTS_EXAMPLE,
        },
        "text": {
            "type": "string",
            "description": "Instead of box/point prompts: a phrase such as `nucleus`; CLIPSeg's heat map gives one "
            "box per blob, SAM a mask per box. The answer also has the `boxes` and each blob's peak heat "
            "(`text_peaks`).",
        },
        "mask_format": _MASK_FORMAT,
    }
)

AUTO_BODY = _multipart({"image": _IMAGE, "mask_format": _MASK_FORMAT})

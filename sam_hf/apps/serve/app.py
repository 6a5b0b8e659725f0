"""Serve a SAM checkpoint over HTTP: prompted masks, automatic masks, and limits that keep bad input out.

```python
import uvicorn
from sam_hf.apps.serve import ServeSettings, create_app

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
never share the predictor's image state (`jobs`). Bad input gets a 4xx JSON `{"detail": "..."}` that says what was
wrong; the OpenAPI description (`/openapi.json`, from `schema`) documents every status with its body.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image

from .requests import _file_part, _mask_format, _read_form, _text_part, _UploadLimit
from .schema import _PROMPTS_EXAMPLE, AUTO_BODY, AUTO_RESPONSES, HEALTH_RESPONSES, SEGMENT_BODY, SEGMENT_RESPONSES
from .service import _ModelService
from .settings import ServeSettings, _MaskFormatQuery

logger = logging.getLogger(__name__)


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

    # The body limit sits on the ASGI receive channel, so every body is held to it while it arrives.
    app.add_middleware(_UploadLimit, max_upload_bytes=settings.max_upload_bytes)

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
        jobs = service.jobs
        if jobs.pending >= settings.max_pending:
            raise HTTPException(
                503,
                f"The server already has max_pending = {settings.max_pending} requests in flight; retry shortly.",
                headers={"Retry-After": "1"},
            )
        jobs.pending += 1
        try:
            content = await handler(service)
        finally:
            jobs.pending -= 1
        return Response(content=content, media_type="application/json")

    @app.get("/health", responses=HEALTH_RESPONSES)
    async def health(request: Request) -> JSONResponse:
        """The model id, its device, and whether the model is loaded and serving."""
        service: _ModelService | None = getattr(request.app.state, "service", None)
        ready = service is not None and service.ready
        body = {"model": model, "device": service.device if service else None, "ready": ready}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.post("/segment", openapi_extra=SEGMENT_BODY, responses=SEGMENT_RESPONSES)
    async def segment(
        request: Request,
        mask_format: _MaskFormatQuery = None,
    ) -> Response:
        """Masks for each box and/or point prompt, or for a `text` prompt; all prompts share one image encoding.

        Returns `{"width", "height", "mask_format", "multimask_output", "masks", "scores"}`, where `masks[i][j]` is
        mask `j` of prompt `i` (1 mask per prompt, or 3 with `multimask_output`) and `scores[i][j]` its predicted IoU.
        """

        async def handle(service: _ModelService) -> bytes:
            form = await _read_form(request, "an `image` file part and a `prompts` JSON part")
            try:
                fmt = _mask_format(mask_format, form)
                data = await _file_part(form, "image", "cells.png")
                text = await _text_part(form, "text", '"nucleus"') if "text" in form else None
                prompts = (
                    await _text_part(form, "prompts", _PROMPTS_EXAMPLE) if text is None or "prompts" in form else "{}"
                )
            finally:
                await form.close()
            return await service.jobs.run(lambda cancelled: service.segment(cancelled, data, prompts, fmt, text))

        return await guarded(request, handle)

    @app.post("/segment/auto", openapi_extra=AUTO_BODY, responses=AUTO_RESPONSES)
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
            form = await _read_form(request, "an `image` file part")
            try:
                fmt = _mask_format(mask_format, form)
                data = await _file_part(form, "image", "cells.png")
            finally:
                await form.close()
            return await service.jobs.run(
                lambda cancelled: service.auto.segment(cancelled, data, fmt, points, pipeline_kwargs)
            )

        return await guarded(request, handle)

    return app

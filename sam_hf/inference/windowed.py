"""Prediction on windows of an image: tiles, object crops, and refinement of automatic masks on object crops."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torchvision.ops import nms

from ..core.images import to_rgb_array
from ..core.masks import boxes_from_masks
from ..core.prompts import validate_prompts
from ..core.windows import check_crop_scale, object_window, tile_origins
from .predictor import SamPrediction

logger = logging.getLogger(__name__)


class _WindowedPredictor:
    """A `SamPredictor` that decodes each prompt on a window of the image and pastes its mask back; subclasses choose
    the window (`window`). `set_image` keeps the image; each window a prompt needs is encoded when it is first used
    and kept until another one is. The logits returned are those of each prompt's window, so they cannot be fed back
    as `mask_input`.

    `batch_size` windows are encoded in one vision-encoder call (`SamPredictor.encode_batch`); it defaults to 8 on a
    GPU, where batches keep the device busy, and 1 on CPUs. The masks do not depend on it.
    """

    #: What the windows are, for messages.
    what = "window"

    def __init__(self, predictor: Any, batch_size: int | None = None):
        if batch_size is None:
            device = getattr(predictor, "device", None)
            batch_size = 8 if device is not None and torch.device(device).type == "cuda" else 1
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.predictor = predictor
        self.batch_size = batch_size
        self.image: np.ndarray | None = None
        self._encoded: tuple[int, int, int, int] | None = None

    def set_image(self, image: Any) -> None:
        self.image = to_rgb_array(image)
        self._encoded = None

    def window(self, extent: np.ndarray) -> tuple[int, int, int, int] | None:
        """`(y0, x0, y1, x1)` of the window to decode a prompt of xyxy `extent` on, or `None` for the whole image."""
        raise NotImplementedError

    def _full(self, window: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
        return window or (0, 0, *self.image.shape[:2])

    def _encode(self, windows: list[tuple[int, int, int, int] | None]) -> dict[Any, Any]:
        """Features of `windows` from one batched encoder call, by window; empty when batching does not apply."""
        todo = [w for w in windows if self._full(w) != self._encoded]
        if self.batch_size == 1 or len(todo) < 2 or not hasattr(self.predictor, "encode_batch"):
            return {}
        crops = [self.image[y0:y1, x0:x1] for y0, x0, y1, x1 in map(self._full, todo)]
        return dict(zip(todo, self.predictor.encode_batch(crops)))

    def _use(self, window: tuple[int, int, int, int] | None, features: Any = None) -> tuple[int, int]:
        window = self._full(window)
        if window != self._encoded:
            y0, x0, y1, x1 = window
            if features is not None:
                self.predictor.set_image_embeddings(*features)
            else:
                self.predictor.set_image(self.image[y0:y1, x0:x1])
            self._encoded = window
        return window[0], window[1]

    def predict(self, boxes: Any = None, points: Any = None, point_labels: Any = None, **kwargs: Any) -> SamPrediction:
        if self.image is None:
            raise RuntimeError("Call `set_image(image)` before `predict(...)`.")
        if kwargs.get("mask_input") is not None:
            raise ValueError(
                f"mask_input is not supported with {self.what}s: the logits of such a prediction are per {self.what}."
            )
        height, width = self.image.shape[:2]
        boxes, points, labels = validate_prompts((height, width), boxes, points, point_labels)
        n = len(boxes) if boxes is not None else len(points)
        groups: dict[tuple[int, int, int, int] | None, list[int]] = {}
        for i in range(n):
            corners = [boxes[i].reshape(2, 2)] if boxes is not None else []
            if points is not None:
                corners.append(points[i])
            xy = np.concatenate(corners)
            groups.setdefault(self.window(np.concatenate([xy.min(0), xy.max(0)])), []).append(i)
        if None in groups:
            logger.info("%d prompt(s) fit in no %s: decoded on the whole image.", len(groups[None]), self.what)
        masks: list[np.ndarray | None] = [None] * n
        scores: list[np.ndarray | None] = [None] * n
        logits: list[np.ndarray | None] = [None] * n
        windows = list(groups)
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start : start + self.batch_size]
            encoded = self._encode(chunk)
            for window in chunk:
                members = groups[window]
                y0, x0 = self._use(window, encoded.get(window))
                offset = np.array([x0, y0], np.float64)
                sub = {}
                if boxes is not None:
                    sub["boxes"] = boxes[members] - np.tile(offset, 2)
                if points is not None:
                    sub["points"] = points[members] - offset
                    sub["point_labels"] = labels[members]
                result = self.predictor.predict(**sub, **kwargs)
                for j, i in enumerate(members):
                    full = np.zeros((result.masks.shape[1], height, width), bool)
                    crop_h, crop_w = result.masks.shape[-2:]
                    full[:, y0 : y0 + crop_h, x0 : x0 + crop_w] = result.masks[j]
                    masks[i], scores[i], logits[i] = full, result.scores[j], result.logits[j]
        return SamPrediction(np.stack(masks), np.stack(scores), np.stack(logits))

    def __call__(self, image: Any, **prompts: Any) -> SamPrediction:
        self.set_image(image)
        return self.predict(**prompts)


class TiledPredictor(_WindowedPredictor):
    """A `SamPredictor` over the tiles of a large image: each prompt is decoded on one tile and pasted back.

    Args:
        predictor (`SamPredictor`): the model.
        tile_size (`int`) / tile_overlap (`int`): the tiling, as in training.
        batch_size (`int`, *optional*): tiles per vision-encoder call; 8 on a GPU and 1 on CPUs by default.

    `set_image` keeps the image; `predict` encodes each tile that a prompt needs (once per image and tile) and
    returns masks at the full image's resolution. The logits it returns are those of each prompt's tile, so they
    cannot be fed back as `mask_input`.
    """

    what = "tile"

    def __init__(self, predictor: Any, tile_size: int, tile_overlap: int = 0, batch_size: int | None = None):
        super().__init__(predictor, batch_size)
        self.tile_size, self.tile_overlap = tile_size, tile_overlap

    def choose_tile(self, extent: np.ndarray) -> tuple[int, int] | None:
        """The tile holding the xyxy `extent` with the widest margin, or `None` when no tile holds it."""
        height, width = self.image.shape[:2]
        best, best_margin = None, -1.0
        for y0, x0 in tile_origins(height, width, self.tile_size, self.tile_overlap):
            y1, x1 = min(y0 + self.tile_size, height), min(x0 + self.tile_size, width)
            margin = min(extent[0] - x0, extent[1] - y0, x1 - 1 - extent[2], y1 - 1 - extent[3])
            if margin >= 0 and margin > best_margin:
                best, best_margin = (y0, x0), margin
        return best

    def window(self, extent: np.ndarray) -> tuple[int, int, int, int] | None:
        origin = self.choose_tile(extent)
        if origin is None:
            return None
        height, width = self.image.shape[:2]
        y0, x0 = origin
        return y0, x0, min(y0 + self.tile_size, height), min(x0 + self.tile_size, width)


class ObjectCropPredictor(_WindowedPredictor):
    """A `SamPredictor` that decodes each prompt on its own object crop (`object_window`), as a model trained with
    `--object_crop_scale` saw its objects, and pastes the mask back into the full image.

    Args:
        predictor (`SamPredictor`): the model.
        scale (`float`): side of each crop as a multiple of the longer side of the prompt's box, as in training.
        batch_size (`int`, *optional*): crops per vision-encoder call; 8 on a GPU and 1 on CPUs by default.

    Each prompt's crop is encoded for it (prompts with the same crop share one encoding). The crop is placed around
    the box, or around the points of a prompt without a box, whose extent is usually smaller than the object: give
    boxes.
    """

    what = "object crop"

    def __init__(self, predictor: Any, scale: float, batch_size: int | None = None):
        check_crop_scale(scale)
        super().__init__(predictor, batch_size)
        self.scale = scale

    def window(self, extent: np.ndarray) -> tuple[int, int, int, int]:
        return object_window(extent, self.scale, *self.image.shape[:2])


def refine_on_object_crops(
    predictor: Any, image: Any, masks: Any, scale: float, nms_thresh: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the box of each of `masks` again on its own object crop, and keep the best of overlapping results.

    Automatic mask generation prompts a grid of points on the whole image (or on the pipeline's crops), where a model
    tuned with `--object_crop_scale` sees its objects at another size than in training. Here each mask serves as a
    proposal: its box is decoded by `ObjectCropPredictor` on a crop of `scale` times its longer side, as the model was
    tuned. The refined masks are ranked by their predicted IoU and, as in the pipeline, of two masks whose boxes
    overlap more than `nms_thresh` (box IoU) only the higher-scoring one is kept.

    Args:
        predictor (`SamPredictor`): the model.
        image: the image the masks belong to (PIL image or `(H, W[, C])` array).
        masks (`array-like`): `(N, H, W)` proposals (bool arrays or tensors); empty ones are skipped.
        scale (`float`): side of each crop as a multiple of the longer side of a proposal's box.
        nms_thresh (`float`, *optional*, defaults to 0.7): box IoU above which the lower-scoring mask is dropped.

    Returns:
        `(masks, scores)`: `(M, H, W)` bool refined masks and their `(M,)` predicted IoUs, highest first. Proposals
        with the same box are decoded once; refined masks that come back empty are dropped (counted in the log).
    """

    check_crop_scale(scale)
    image = to_rgb_array(image)
    height, width = image.shape[:2]
    proposals = [np.asarray(m.cpu() if hasattr(m, "cpu") else m, bool) for m in masks]
    proposals = [m for m in proposals if m.any()]
    if not proposals:
        return np.zeros((0, height, width), bool), np.zeros(0, np.float32)
    boxes = np.unique(boxes_from_masks(proposals), axis=0)
    result = ObjectCropPredictor(predictor, scale)(image, boxes=boxes)
    refined, scores = result.masks[:, 0], result.scores[:, 0].astype(np.float32)
    filled = refined.reshape(len(refined), -1).any(axis=1)
    if not filled.all():
        logger.debug("%d of %d refined masks came back empty and are dropped.", int((~filled).sum()), len(filled))
    refined, scores = refined[filled], scores[filled]
    if not len(refined):
        return np.zeros((0, height, width), bool), np.zeros(0, np.float32)
    keep = nms(torch.from_numpy(boxes_from_masks(refined)), torch.from_numpy(scores), nms_thresh).numpy()
    logger.debug(
        "Object-crop refinement: %d proposals, %d distinct boxes, %d masks kept.",
        len(proposals),
        len(boxes),
        len(keep),
    )
    return refined[keep], scores[keep]

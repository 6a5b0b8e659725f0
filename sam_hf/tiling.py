"""Large images as tiles: training and evaluation rows cut into overlapping tiles, and prediction on tiles.

Training on tiles (`--tile_size`, `--tile_overlap`): each image and its instance map are cut into square tiles that
overlap by `tile_overlap` pixels. The last tile of each row and column is aligned with the image edge. An image no
larger than a tile stays whole. The tile edges cut some objects, and each cut object is handled explicitly:

- an object whose visible part in the tile holds at least `min_visible` of its area stays an object of that tile.
  Its prompt box and label are the visible part;
- a smaller fragment is removed from the tile's objects: its pixels become background in that tile's instance map.
  Another tile (they overlap) holds more of it.

The counts of whole, cut-and-kept and dropped fragments are logged per split.

Prediction on tiles (`TiledPredictor`): each prompt is decoded on the tile that contains it with the widest margin,
and its mask is pasted back into the full image. A prompt that fits in no tile is decoded on the whole image.

Object crops (`--object_crop_scale`, `crop_objects`, `ObjectCropPredictor`): one square window per object, `scale`
times the longer side of its box and centred on it, so that every object reaches the model at about the same size,
whatever its size in the image. Small objects are enlarged (nuclei 10 px wide fill a few cells of a 32x32 embedding
grid when the whole image is the input) and large ones are never cut. A training or evaluation row is one object
in its crop: the other objects of the window are background there. Prediction crops around each box prompt the same
way; each crop is encoded once per prompt.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from .data import boxes_from_instances, mask_to_instances, to_rgb_array
from .inference import SamPrediction, validate_prompts

logger = logging.getLogger(__name__)

__all__ = [
    "ObjectCropPredictor",
    "TiledPredictor",
    "crop_objects",
    "object_window",
    "refine_on_object_crops",
    "tile_dataset",
    "tile_origins",
]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: a stride of `tile - overlap`, the last tile ending at the edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def tile_origins(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """`(y0, x0)` of every tile of an image, row by row."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"Expected tile_size >= 1 and 0 <= tile_overlap < tile_size, got {tile} and {overlap}.")
    return [(y, x) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def _tile_instances(crop: np.ndarray, areas: np.ndarray, min_visible: float, counts: Counter) -> np.ndarray:
    """The tile's instance map, renumbered 1..n, without fragments below `min_visible` of their object."""
    ids, visible = np.unique(crop[crop > 0], return_counts=True)
    out = np.zeros(crop.shape, np.uint16)
    kept = 0
    for obj, n in zip(ids, visible):
        fraction = n / areas[obj]
        if fraction >= min_visible:
            kept += 1
            out[crop == obj] = kept
            counts["whole" if n == areas[obj] else "cut_kept"] += 1
        else:
            counts["cut_dropped"] += 1
    return out


def _rows(
    batch: dict[str, list], indices: list[int], mask_type: str, split_name: str
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """`(name, RGB image, instance map)` of each row of a `datasets.map` batch, the two sizes checked."""
    for row, index in enumerate(indices):
        name = batch["file_name"][row] if "file_name" in batch else str(index)
        image = to_rgb_array(batch["image"][row])
        instances = mask_to_instances(batch["label"][row], mask_type)
        if instances.shape != image.shape[:2]:
            raise ValueError(
                f"{split_name} row {index} ({name}): image {image.shape[:2]} and mask {instances.shape} differ."
            )
        yield name, image, instances


def _png(array: np.ndarray) -> dict[str, Any]:
    """An RGB array as PNG bytes for a `datasets.Image` column, at compression level 1: lossless like `datasets`' own
    encoding (level 6), about three times faster to write, and about a quarter larger."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def _cut_rows(
    ds: datasets.Dataset,
    cut: Callable[[dict[str, list], list[int]], dict[str, list]],
    extra: dict,
    desc: str,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """`ds.map(cut)` into rows of `image` (RGB, `_png`) and `label` (PIL images of 16-bit instance maps, stored as
    `datasets` stores them), `file_name`, `source_file_name` (the image a row was cut from: evaluation reports
    per-image scores by it), and the `extra` features; in `num_proc` processes (`--preprocessing_num_workers`)."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.Image(),
            "file_name": datasets.Value("string"),
            "source_file_name": datasets.Value("string"),
            **extra,
        }
    )
    return ds.map(
        cut,
        with_indices=True,
        batched=True,
        batch_size=8,
        remove_columns=ds.column_names,
        features=features,
        num_proc=num_proc,
        desc=desc,
    )


def check_crop_scale(scale: float, name: str = "--object_crop_scale", off: bool = False) -> None:
    """Refuse an object-crop scale below 1, whose crops would not hold their boxes; with `off`, 0 (no crops) passes.
    `name` is the flag or setting the message names."""
    if isinstance(scale, bool) or not (scale >= 1 or (off and scale == 0)):
        either = " (or 0: off)" if off else ""
        raise ValueError(f"{name} must be >= 1{either} so that each crop holds its object, got {scale!r}.")


def tile_dataset(
    ds: datasets.Dataset,
    tile_size: int,
    tile_overlap: int = 0,
    min_visible: float = 0.5,
    mask_type: str = "auto",
    split_name: str = "train",
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Cut every row (`image`, `label`) into tiles; the labels become instance maps (`mask_type="instance"`).

    Args:
        ds (`datasets.Dataset`): rows with `image` and `label` (and optionally `file_name`).
        tile_size (`int`): side of the square tiles, in pixels.
        tile_overlap (`int`, *optional*, defaults to 0): overlap of neighbouring tiles, in pixels.
        min_visible (`float`, *optional*, defaults to 0.5): a cut object stays an object of a tile when at least
            this fraction of its area lies inside it.
        mask_type (`str`, *optional*, defaults to `"auto"`): how the labels become objects (`mask_to_instances`).
        split_name (`str`): for logs.
        num_proc (`int`, *optional*): processes that cut the rows (`datasets.Dataset.map`).

    Returns:
        A dataset with one row per tile: `image`, `label` (uint16 instance map), `file_name`
        (`<name>@y<y0>x<x0>`) and `source_file_name` (`<name>`).
    """
    if not 0 < min_visible <= 1:
        raise ValueError(f"--tile_min_visible must be in (0, 1], got {min_visible}.")

    def cut(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "label": [], "file_name": [], "source_file_name": [], "_tile_counts": []}
        for name, image, instances in _rows(batch, indices, mask_type, split_name):
            areas = np.bincount(instances.ravel())
            for y0, x0 in tile_origins(*instances.shape, tile_size, tile_overlap):
                counts: Counter = Counter()
                crop = instances[y0 : y0 + tile_size, x0 : x0 + tile_size]
                out["label"].append(Image.fromarray(_tile_instances(crop, areas, min_visible, counts)))
                out["image"].append(_png(image[y0 : y0 + tile_size, x0 : x0 + tile_size]))
                out["file_name"].append(f"{name}@y{y0}x{x0}")
                out["source_file_name"].append(name)
                out["_tile_counts"].append([counts["whole"], counts["cut_kept"], counts["cut_dropped"]])
        return out

    counts_feature = {"_tile_counts": datasets.List(datasets.Value("int64"), length=3)}
    tiled = _cut_rows(ds, cut, counts_feature, f"Cutting tiles ({split_name})", num_proc)
    whole, kept, dropped = np.asarray(tiled["_tile_counts"], np.int64).reshape(-1, 3).sum(0).tolist()
    logger.info(
        "Split %r: %d images -> %d tiles of %d px (overlap %d); objects per tile: %d whole, %d cut by the tile edge "
        "and kept (at least %.0f%% visible), %d fragments dropped",
        split_name,
        len(ds),
        len(tiled),
        tile_size,
        tile_overlap,
        whole,
        kept,
        100 * min_visible,
        dropped,
    )
    return tiled.remove_columns("_tile_counts")


def object_window(box: Any, scale: float, height: int, width: int) -> tuple[int, int, int, int]:
    """`(y0, x0, y1, x1)` (end exclusive) of the square window around the xyxy `box` (inclusive pixel coordinates):
    `ceil(scale * longer side)` pixels, centred on the box, moved inside the image and cut to it where the image is
    smaller. With `scale >= 1` the window holds the whole box."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
    side = int(np.ceil(scale * max(x1 - x0 + 1, y1 - y0 + 1)))

    def span(low: float, high: float, size: int) -> tuple[int, int]:
        start = int(np.floor((low + high + 1) / 2 - side / 2 + 0.5))
        start = min(max(start, 0), max(size - side, 0))
        return start, min(start + side, size)

    (wy0, wy1), (wx0, wx1) = span(y0, y1, height), span(x0, x1, width)
    return wy0, wx0, wy1, wx1


def crop_objects(
    ds: datasets.Dataset,
    scale: float,
    mask_type: str = "auto",
    split_name: str = "train",
    point_scale: float | None = None,
    point_every: int = 4,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """One row per object: its `object_window` crop of the image, and a label that holds only that object.

    The label of a crop says nothing of the other objects in its window, so each row also lists up to
    `NUM_BACKGROUND_POINTS` pixels of the window that belong to no object at all (`background_points`, xy in the
    crop), for the background prompts of training (`SamTransform(background_points=True)`).

    With `point_scale`, every `point_every`-th object of each image (in a fixed, name-keyed order) also gets a second
    row: its crop at `point_scale`, flagged `point_only`, which only the multimask point pass of `SamTrainer` trains
    on. A larger scale shows the point prompts objects at about the size they have on whole images, where automatic
    mask generation prompts them, while the box prompts stay at `scale`.

    Args:
        ds (`datasets.Dataset`): rows with `image` and `label` (and optionally `file_name`).
        scale (`float`): side of each crop, as a multiple of the longer side of the object's box (at least 1).
        mask_type (`str`, *optional*, defaults to `"auto"`): how the labels become objects (`mask_to_instances`).
        split_name (`str`): for logs and errors.
        point_scale (`float`, *optional*): scale of the extra point-prompt rows; none without it.
        point_every (`int`, *optional*, defaults to 4): with `point_scale`, one object in this many gets such a row.
        num_proc (`int`, *optional*): processes that cut the rows (`datasets.Dataset.map`).

    Returns:
        A dataset with `image` (the crop), `label` (uint16, 1 on the object, 0 elsewhere, the other objects of the
        crop included), `file_name` (`<name>#<object id>`, `<name>#<object id>@<point_scale>` for point rows),
        `source_file_name` (`<name>`), `background_points`, and with `point_scale` the `point_only` flag.
    """
    check_crop_scale(scale)
    if point_scale is not None:
        check_crop_scale(point_scale, name="--point_crop_scale")
        if point_every < 1:
            raise ValueError(f"--point_crop_every must be >= 1, got {point_every}.")
    scales = [(scale, False)] + ([(point_scale, True)] if point_scale is not None else [])

    def cut(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        columns = ["image", "label", "file_name", "source_file_name", "background_points"]
        out: dict[str, list] = {c: [] for c in columns + (["point_only"] if point_scale is not None else [])}
        for name, image, instances in _rows(batch, indices, mask_type, split_name):
            offset = zlib.crc32(name.encode())
            for k, box in enumerate(boxes_from_instances(instances), start=1):
                for s, point_only in scales:
                    if point_only and (k + offset) % point_every:
                        continue
                    y0, x0, y1, x1 = object_window(box, s, *instances.shape)
                    window = instances[y0:y1, x0:x1]
                    out["image"].append(_png(image[y0:y1, x0:x1]))
                    out["label"].append(Image.fromarray((window == k).astype(np.uint16)))
                    out["file_name"].append(f"{name}#{k}@{s:g}" if point_only else f"{name}#{k}")
                    out["source_file_name"].append(name)
                    out["background_points"].append(_background_sample(window, [offset, k, int(point_only)]))
                    if point_scale is not None:
                        out["point_only"].append(point_only)
        return out

    extra = {"background_points": datasets.List(datasets.List(datasets.Value("int32"), length=2))}
    if point_scale is not None:
        extra["point_only"] = datasets.Value("bool")
    cropped = _cut_rows(ds, cut, extra, f"Cropping objects ({split_name})", num_proc)
    logger.info(
        "Split %r: %d images -> %d object crops, each %g x the longer side of its object's box",
        split_name,
        len(ds),
        len(cropped) - (sum(cropped["point_only"]) if point_scale is not None else 0),
        scale,
    )
    if point_scale is not None:
        logger.info(
            "Split %r: %d more crops of %g x for the point prompts (one object in %d)",
            split_name,
            sum(cropped["point_only"]),
            point_scale,
            point_every,
        )
    return cropped


#: Background pixels kept per object crop, for background point prompts.
NUM_BACKGROUND_POINTS = 16


def _background_sample(window: np.ndarray, key: list[int]) -> list[list[int]]:
    """Up to `NUM_BACKGROUND_POINTS` distinct xy pixels of `window` (an instance map) outside every object, drawn
    with a generator keyed by `key`; empty when every pixel belongs to an object."""
    ys, xs = np.nonzero(window == 0)
    rng = np.random.default_rng(key)
    picked = rng.choice(len(ys), size=min(NUM_BACKGROUND_POINTS, len(ys)), replace=False)
    return [[int(xs[j]), int(ys[j])] for j in picked]


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


def _mask_boxes(masks: Any) -> np.ndarray:
    """Inclusive xyxy boxes `(N, 4)` of non-empty `(H, W)` bool masks, one mask at a time: memory stays at one row
    and one column profile per mask, where a stacked `(N, H, W)` computation would hold several copies of them all."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[k] = cols[0], rows[0], cols[-1], rows[-1]
    return boxes


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
    from torchvision.ops import nms

    check_crop_scale(scale)
    image = to_rgb_array(image)
    height, width = image.shape[:2]
    proposals = [np.asarray(m.cpu() if hasattr(m, "cpu") else m, bool) for m in masks]
    proposals = [m for m in proposals if m.any()]
    if not proposals:
        return np.zeros((0, height, width), bool), np.zeros(0, np.float32)
    boxes = np.unique(_mask_boxes(proposals), axis=0)
    result = ObjectCropPredictor(predictor, scale)(image, boxes=boxes)
    refined, scores = result.masks[:, 0], result.scores[:, 0].astype(np.float32)
    filled = refined.reshape(len(refined), -1).any(axis=1)
    if not filled.all():
        logger.debug("%d of %d refined masks came back empty and are dropped.", int((~filled).sum()), len(filled))
    refined, scores = refined[filled], scores[filled]
    if not len(refined):
        return np.zeros((0, height, width), bool), np.zeros(0, np.float32)
    keep = nms(torch.from_numpy(_mask_boxes(refined)), torch.from_numpy(scores), nms_thresh).numpy()
    logger.debug(
        "Object-crop refinement: %d proposals, %d distinct boxes, %d masks kept.",
        len(proposals),
        len(boxes),
        len(keep),
    )
    return refined[keep], scores[keep]

"""Data: load image/mask sources, turn masks into objects and box prompts, and build model inputs.

The pipeline is:

1. `load_source` returns a `DatasetDict` with an image column and a mask column, from a Hub dataset id, a directory
   written by `save_to_disk`, or a plain folder with `images/`, `masks/` and optional `instances/`.
2. `index_objects` (a cached `datasets.map`) reads each mask once, turns it into an instance map (one id per object)
   and stores every object's exact xyxy box. Images without objects are dropped, counted and logged.
3. `SamTransform`, attached with `with_transform`, decodes an image on the fly, samples up to
   `max_objects_per_image` objects, jitters their boxes (training only) and produces `pixel_values`, `input_boxes` and
   `labels`. Labels are resized and padded exactly as `SamProcessor` resizes and pads the image.
4. `SamDataCollator` pads the number of objects across a batch; padded objects carry `-100` labels.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from transformers import SamProcessor

from ..core.images import encode_images, resized_shape, scale_coords, to_rgb_array
from ..core.masks import mask_to_instances
from ..family.geometry import Geometry
from .cache import read_embedding

LABEL_PAD = -100.0


EMBEDDING_KEYS = ("image_embeddings", "image_digest", "embedding_checksum")


def jitter_boxes(
    boxes: np.ndarray, max_shift: float, image_size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Move every side of every xyxy box outward by a uniform random amount in `[0, max_shift]` pixels.

    Boxes stay inside the image: `0 <= x <= W - 1`, `0 <= y <= H - 1` for `image_size = (H, W)`.
    """
    if max_shift < 0:
        raise ValueError(f"box_jitter must be >= 0, got {max_shift}.")
    height, width = image_size
    shift = rng.uniform(0, max_shift, size=boxes.shape) * np.array([-1, -1, 1, 1])
    out = boxes + shift
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width - 1)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height - 1)
    return out.astype(np.float32)


def resize_and_pad_masks(masks: torch.Tensor, longest_edge: int, pad_size: int, chunk_size: int = 64) -> torch.Tensor:
    """Resize `(N, H, W)` binary masks the way `SamProcessor` resizes the image, then pad bottom/right with zeros.

    The masks keep their aspect ratio (longest side `longest_edge`, same rounding as the image processor) and sit
    top-left in a `(pad_size, pad_size)` frame, exactly like the image in `pixel_values`. Area-style (antialiased
    bilinear) resampling gives soft labels in [0, 1], so objects smaller than one low-resolution pixel do not vanish.

    Masks are resized `chunk_size` at a time: besides the input and the output, at most `chunk_size` x H x W float32
    values exist at once, whatever `N`.

    Returns:
        `torch.FloatTensor` of shape `(N, pad_size, pad_size)`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    n, height, width = masks.shape
    new_h, new_w = resized_shape(height, width, longest_edge)
    out = torch.zeros(n, pad_size, pad_size)
    for start in range(0, n, chunk_size):
        chunk = masks[start : start + chunk_size, None].float()
        resized = F.interpolate(chunk, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk_size, :new_h, :new_w] = resized[:, 0].clamp_(0, 1)
    return out


@functools.lru_cache(maxsize=32)
def _resize_weights(size: int, new_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `(new_size, size)` matrix of `F.interpolate(mode="bilinear", antialias=True)` along one axis, and for each
    input index the first and last output index it reaches."""
    # F.interpolate of an identity image along its last axis (the other axis keeps its size, an exact identity).
    eye = torch.eye(size)[None, None]
    weights = F.interpolate(eye, size=(size, new_size), mode="bilinear", antialias=True, align_corners=False)[0, 0].T
    weights = weights.numpy().astype(np.float32)
    reached = weights != 0
    first = reached.argmax(axis=0)
    last = new_size - 1 - reached[::-1].argmax(axis=0)
    return weights, first, last


def object_labels(
    instances: np.ndarray, boxes: np.ndarray, ids: np.ndarray, label_shape: tuple[int, int], pad_size: int
) -> torch.Tensor:
    """Soft low-resolution labels `(K, pad_size, pad_size)` of the objects `ids` of an instance map, equal (to float
    rounding) to `resize_and_pad_masks` of their full-resolution masks, computed only inside each object's box.

    Antialiased bilinear resizing is separable: an object's label is `Wy @ mask @ Wx.T` with one resize matrix per
    axis, and only the rows of `Wy` and `Wx` that reach the object's box are non-zero. Each object therefore costs a
    product of its box-sized crop instead of a resize of the whole image, which is what keeps label building off the
    critical path of a training step.

    Args:
        instances (`np.ndarray`): `(H, W)` instance map.
        boxes (`np.ndarray`): `(K, 4)` exact inclusive xyxy boxes of the objects (`index_objects`' `boxes`).
        ids (`np.ndarray`): `(K,)` instance ids of the objects.
        label_shape (`tuple[int, int]`): `(H, W)` of the image inside the low-resolution mask frame, as the family's
            processor resizes it (`sam_hf.family.Geometry.label_shape`: aspect kept for SAM, the whole frame for
            SAM 2).
        pad_size (`int`): side of the square low-resolution mask frame; the rest is padding.
    """
    height, width = instances.shape
    new_h, new_w = label_shape
    wy, first_y, last_y = _resize_weights(height, new_h)
    wx, first_x, last_x = _resize_weights(width, new_w)
    # numpy, not torch: these products are tiny, and torch's thread pool costs more than they do on a busy CPU.
    out = np.zeros((len(ids), pad_size, pad_size), np.float32)
    for k, ((x0, y0, x1, y1), obj) in enumerate(zip(np.asarray(boxes, np.int64), ids)):
        crop = (instances[y0 : y1 + 1, x0 : x1 + 1] == obj).astype(np.float32)
        j0, j1, i0, i1 = first_y[y0], last_y[y1] + 1, first_x[x0], last_x[x1] + 1
        out[k, j0:j1, i0:i1] = wy[j0:j1, y0 : y1 + 1] @ crop @ wx[i0:i1, x0 : x1 + 1].T
    return torch.from_numpy(np.clip(out, 0, 1, out=out))


class SamTransform:
    """On-the-fly transform for `Dataset.with_transform`: images + objects -> SAM inputs and labels.

    Args:
        processor (`SamProcessor`): the model's processor; it resizes, normalises and pads images and scales boxes.
        train (`bool`): sample objects at random and jitter boxes (training), or keep every object with its exact box.
        box_jitter (`float`, *optional*, defaults to 0): maximum outward shift of each box side, in original pixels.
        max_objects_per_image (`int`, *optional*): cap on prompts per image; sampled at random when training, the
            first ones otherwise. `None` keeps all.
        mask_type (`str`, *optional*, defaults to `"auto"`): see `mask_to_instances`.
        seed (`int`, *optional*): seed of the prompt-side randomness. Each row's draws come from a generator keyed by
            `(seed, epoch, row)` (the row's `row_index` column from `index_objects`, or a hash of its boxes), so they
            change every epoch (`set_epoch`) and do not depend on dataloader workers or restarts.
        with_instances (`bool`): also return the original-resolution instance map and the object ids, for metrics.
            In evaluation (`train=False`) the `labels` are then left out: `SamTrainer` makes them from the instance
            map `eval_chunk_size` objects at a time, so that an image's labels never exist all at once.
        point_prompts (`bool`, *optional*, defaults to `False`): also return `input_points` `(K, 1, 2)` (one point
            drawn uniformly from each object's pixels, in the resized frame) and `input_labels` `(K, 1)`, for
            multimask training.
        background_points (`bool`, *optional*, defaults to `False`): when training with `point_prompts`, also return
            one point on no object per image, `background_points` `(1, 1, 2)` in the resized frame, with
            `background_labels` `(1, 1)`: 1, or -10 (the label SAM's prompt encoder embeds as nothing, like padding)
            for an image without background. It comes from the row's `background_points` column (object crops, whose
            label holds one object) or else from the pixels outside every object of the label.

    Rows flagged `point_only` (`crop_objects(point_scale=...)`) are for the multimask point pass only: their `labels`
    are all `-100`, so no box loss and no object count sees them, and their targets go to `point_labels`, which every
    row of such a dataset carries (the same as `labels` for the other rows), with a `point_only` flag.

    When the dataset carries cached `image_embeddings` (see `sam_hf.data.cache`), they replace `pixel_values` and no
    image is decoded; each row's checksum is verified as it is read (`sam_hf.data.EmbeddingCacheError` when it fails).

    Output per example: `pixel_values` `(3, S, S)` or `image_embeddings` `(C, g, g)`, `input_boxes` `(K, 4)` in the
    resized frame, `labels` `(K, m, m)` soft masks in the low-resolution frame, `original_sizes` `(2,)`,
    `reshaped_input_sizes` `(2,)`, and with `with_instances` also `instances` `(H, W)` and `object_ids` `(K,)`.
    """

    def __init__(
        self,
        processor: SamProcessor,
        train: bool,
        box_jitter: float = 0.0,
        max_objects_per_image: int | None = None,
        mask_type: str = "auto",
        seed: int | None = None,
        with_instances: bool = False,
        point_prompts: bool = False,
        background_points: bool = False,
    ):
        self.processor = processor
        self.point_prompts = point_prompts
        self.background_points = background_points and point_prompts and train
        self.train = train
        self.box_jitter = box_jitter if train else 0.0
        self.max_objects_per_image = max_objects_per_image
        self.mask_type = mask_type
        self.seed = seed
        # In shared memory, so that dataloader workers (persistent ones too) see the epoch the trainer sets.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.with_instances = with_instances
        # Where pixels land in the input and the low-resolution masks (padded or plain resize, per family member).
        self.geometry = Geometry.of_processor(processor)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Key the prompt randomness of the rows that follow by `epoch` (`SamTrainer` calls it at each epoch start).

        Dataloader workers read it from shared memory, so it also reaches persistent workers.
        """
        self._epoch[0] = int(epoch)

    def row_rng(self, row_key: int) -> np.random.Generator:
        """The generator of one row's prompts, keyed by `(seed, epoch, row)`.

        The draws are the same whatever the number of dataloader workers, processes or restarts, so a resumed run
        repeats the prompts of an uninterrupted one.
        """
        return np.random.default_rng([self.seed or 0, self.epoch, row_key])

    def select(self, num_objects: int, rng: np.random.Generator) -> np.ndarray:
        k = num_objects if self.max_objects_per_image is None else min(num_objects, self.max_objects_per_image)
        if self.train and k < num_objects:
            return np.sort(rng.choice(num_objects, size=k, replace=False))
        return np.arange(k)

    def sample_points(self, instances: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One xy pixel per object id `(K, 2)`, drawn uniformly from the object's pixels."""
        ys, xs = np.nonzero(instances)
        owner = instances[ys, xs]
        points = np.zeros((len(ids), 2), np.float64)
        for k, obj in enumerate(ids):
            where = np.flatnonzero(owner == obj)
            j = where[rng.integers(len(where))]
            points[k] = (xs[j], ys[j])
        return points

    def sample_background(self, batch: dict[str, list], row: int, instances: np.ndarray, rng: np.random.Generator):
        """One xy pixel `(1, 2)` on no object, from the row's `background_points` or its label; `None` if none."""
        if "background_points" in batch:
            candidates = np.asarray(batch["background_points"][row], np.float64).reshape(-1, 2)
            return candidates[rng.integers(len(candidates))][None] if len(candidates) else None
        ys, xs = np.nonzero(instances == 0)
        if not len(ys):
            return None
        j = rng.integers(len(ys))
        return np.array([[xs[j], ys[j]]], np.float64)

    @staticmethod
    def _row_key(batch: dict[str, list], row: int) -> int:
        if "row_index" in batch:
            return int(batch["row_index"][row])
        return zlib.crc32(np.asarray(batch["boxes"][row], np.float32).tobytes())

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        point_rows = self.train and "point_only" in batch
        out: dict[str, list] = {k: [] for k in self.output_keys("image_embeddings" in batch, point_rows)}
        for row in range(len(batch["boxes"])):
            example = self.transform_row(batch, row, point_rows)
            for key, values in out.items():
                values.append(example[key])
        return out

    def output_keys(self, cached: bool, point_rows: bool) -> list[str]:
        """The columns `__call__` returns: with `cached` embeddings (else `pixel_values`), and with `point_rows` the
        `point_only` flag and `point_labels` (training rows of a dataset with point-prompt crops)."""
        keys = ["image_embeddings" if cached else "pixel_values", "input_boxes"]
        # Evaluation rows with instances carry no labels: SamTrainer makes them from the instance map, a chunk of
        # objects at a time, so that memory does not grow with the objects of an image.
        keys += ["labels"] if self.train or not self.with_instances else []
        keys += ["original_sizes", "reshaped_input_sizes"]
        if self.with_instances:
            keys += ["instances", "object_ids"]
        if self.point_prompts:
            keys += ["input_points", "input_labels"]
        if self.background_points:
            keys += ["background_points", "background_labels"]
        if point_rows:
            keys += ["point_only", "point_labels"]
        return keys

    def transform_row(self, batch: dict[str, list], row: int, point_rows: bool = False) -> dict[str, torch.Tensor]:
        """Row `row` of `batch` as one example: a value for each of `output_keys`.

        The row's random draws come from its own generator (`row_rng`), in this order: the objects kept, the box
        jitter, the interior points, the background point.
        """
        image, original_size, reshaped_size = self.image_side(batch, row)
        instances = mask_to_instances(batch["label"][row], self.mask_type)
        rng = self.row_rng(self._row_key(batch, row))
        keep = self.select(len(batch["boxes"][row]), rng)
        exact = np.asarray(batch["boxes"][row], np.float32)[keep]
        example = {"image_embeddings" if "image_embeddings" in batch else "pixel_values": image}
        example.update(self.row_prompts(batch, row, instances, exact, keep + 1, original_size, reshaped_size, rng))
        if "labels" in self.output_keys("image_embeddings" in batch, point_rows):
            example.update(self.row_labels(batch, row, instances, exact, keep + 1, point_rows))
        example["original_sizes"] = torch.tensor(original_size)
        example["reshaped_input_sizes"] = torch.tensor(reshaped_size)
        if self.with_instances:
            example["instances"], example["object_ids"] = torch.from_numpy(instances), torch.from_numpy(keep + 1)
        return example

    def row_prompts(
        self,
        batch: dict[str, list],
        row: int,
        instances: np.ndarray,
        boxes: np.ndarray,
        ids: np.ndarray,
        original_size: tuple[int, int],
        reshaped_size: tuple[int, int],
        rng: np.random.Generator,
    ) -> dict[str, torch.Tensor]:
        """The prompts of the objects `ids` (exact `boxes`) in the resized frame: `input_boxes` (jittered when
        training), and when asked `input_points` / `input_labels` and `background_points` / `background_labels`,
        drawn from `rng` in that order."""
        scale = functools.partial(scale_coords, original_size=original_size, reshaped_size=reshaped_size)
        if self.box_jitter:
            boxes = jitter_boxes(boxes, self.box_jitter, original_size, rng)
        prompts = {"input_boxes": scale(boxes)}
        if self.point_prompts:
            prompts["input_points"] = scale(self.sample_points(instances, ids, rng))[:, None]
            prompts["input_labels"] = torch.ones(len(ids), 1, dtype=torch.long)
        if self.background_points:
            where = self.sample_background(batch, row, instances, rng)
            found = where is not None
            prompts["background_points"] = scale(where if found else np.zeros((1, 2)))[None]
            prompts["background_labels"] = torch.tensor([[1 if found else -10]], dtype=torch.long)
        return prompts

    def image_side(
        self, batch: dict[str, list], row: int
    ) -> tuple[torch.Tensor | list[torch.Tensor], tuple[int, int], tuple[int, int]]:
        """The row's `pixel_values`, or its cached `image_embeddings` (no image decoding at all), with the image's
        `(height, width)` before and after the processor's resize."""
        if "image_embeddings" in batch:
            embedding = read_embedding({k: batch[k][row] for k in EMBEDDING_KEYS if k in batch})
            original_size = tuple(int(v) for v in batch["original_sizes"][row])
            reshaped_size = tuple(int(v) for v in batch["reshaped_input_sizes"][row])
            return embedding, original_size, reshaped_size
        enc = encode_images(self.processor.image_processor, to_rgb_array(batch["image"][row]))
        original_size = tuple(int(v) for v in enc["original_sizes"][0])
        reshaped_size = tuple(int(v) for v in enc["reshaped_input_sizes"][0])
        return enc["pixel_values"][0], original_size, reshaped_size

    def row_labels(
        self,
        batch: dict[str, list],
        row: int,
        instances: np.ndarray,
        boxes: np.ndarray,
        ids: np.ndarray,
        point_rows: bool,
    ) -> dict[str, torch.Tensor]:
        """The soft low-resolution `labels` of the objects `ids` (exact `boxes`) of the row's instance map; with
        `point_rows`, also `point_labels` and the `point_only` flag (a point-only row's `labels` are all -100)."""
        label_shape = self.geometry.label_shape(*instances.shape)
        labels = object_labels(instances, boxes, ids, label_shape, self.geometry.mask_side)
        if not point_rows:
            return {"labels": labels}
        point_only = bool(batch["point_only"][row])
        return {
            "labels": torch.full_like(labels, LABEL_PAD) if point_only else labels,
            "point_only": torch.tensor(point_only),
            "point_labels": labels,
        }

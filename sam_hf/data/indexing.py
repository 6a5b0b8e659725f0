"""Indexing: every object of every mask with its exact box, and one split prepared as training and evaluation read
it."""

from __future__ import annotations

import logging

import datasets
import numpy as np

from ..config.arguments import DataArguments
from ..core.images import _open_entry
from ..core.masks import _mask_array, boxes_from_instances, mask_to_instances
from .windows import crop_objects, tile_dataset

logger = logging.getLogger(__name__)


def index_objects(
    ds: datasets.Dataset | datasets.IterableDataset,
    mask_type: str = "auto",
    split_name: str = "train",
    num_proc: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Add `boxes` (exact xyxy per object), `areas` (pixels per object), `num_objects` and `row_index` (the row's
    position in `ds`, which keys its prompt randomness in `SamTransform`) columns; drop, count and log images without
    objects.

    Runs as a cached `datasets.map`: each mask is decoded once here and once per use in the transform. A streamed
    `IterableDataset` is indexed lazily, as its rows arrive; each image without objects is logged when it is skipped.
    """

    def _index(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        boxes, areas, counts = [], [], []
        for image, mask, idx in zip(batch["image"], batch["label"], indices):
            where = f"row {idx} of split {split_name!r}"
            image = _open_entry(image, f"The image of {where}", load=False)  # only its size is needed
            mask = _open_entry(mask, f"The mask of {where}")
            try:
                mask_arr = _mask_array(mask)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
            if (image.height, image.width) != mask_arr.shape:
                raise ValueError(
                    f"{where}: image is {image.height}x{image.width} (HxW) but mask is "
                    f"{mask_arr.shape[0]}x{mask_arr.shape[1]}; they must have the same size."
                )
            instances = mask_to_instances(mask_arr, mask_type)
            b = boxes_from_instances(instances)
            boxes.append(b.tolist())
            areas.append(np.bincount(instances.ravel(), minlength=len(b) + 1)[1:].tolist())
            counts.append(len(b))
        return {"boxes": boxes, "areas": areas, "num_objects": counts, "row_index": list(indices)}

    # Images and masks are decoded here rather than by datasets, so that a decompression bomb or a broken file names
    # its row; the columns get their decoding feature back afterwards.
    decoded = {
        c: f for c, f in (ds.features or {}).items() if c in ("image", "label") and isinstance(f, datasets.Image)
    }
    if decoded and not isinstance(ds, datasets.IterableDataset):
        for column in decoded:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    features = ds.features.copy() if ds.features is not None else None
    if features is not None:
        features["boxes"] = datasets.List(datasets.List(datasets.Value("float32"), length=4))
        features["areas"] = datasets.List(datasets.Value("int64"))
        features["num_objects"] = datasets.Value("int32")
        features["row_index"] = datasets.Value("int64")
    if isinstance(ds, datasets.IterableDataset):
        ds = ds.map(_index, batched=True, batch_size=16, with_indices=True, features=features)
        return ds.filter(_has_objects(split_name), with_indices=True, input_columns="num_objects")
    ds = ds.map(
        _index,
        batched=True,
        batch_size=16,
        with_indices=True,
        features=features,
        num_proc=num_proc,
        desc=f"Indexing objects ({split_name})",
    )
    kept = ds.filter(lambda n: n > 0, input_columns="num_objects", desc=f"Dropping empty masks ({split_name})")
    skipped = len(ds) - len(kept)
    if skipped:
        logger.warning("Split %r: skipped %d of %d images whose mask has no object", split_name, skipped, len(ds))
    if len(kept) == 0:
        raise ValueError(
            f"Split {split_name!r} is empty after dropping images without objects ({len(ds)} images "
            "had no non-zero mask pixel). Check --mask_column and --mask_type."
        )
    logger.info("Split %r: %d images, %d objects", split_name, len(kept), sum(kept["num_objects"]))
    for column, feature in decoded.items():
        kept = kept.cast_column(column, feature)
    return kept


def prepare_split(ds: datasets.Dataset | datasets.IterableDataset, data_args: DataArguments, split_name: str):
    """One split as training and evaluation read it: cut to `--max_train_samples` / `--max_eval_samples`, cut into
    tiles with `--tile_size` or object crops with `--object_crop_scale`, then indexed (`index_objects`) with the
    labels' mask type (`DataArguments.label_mask_type`). The training split also gets `--point_crop_scale` crops.

    A streamed split arrives already cut to size (`streaming_splits`), and tiles and crops are refused with
    `--streaming`; it is only indexed.
    """
    if isinstance(ds, datasets.Dataset):
        limit = data_args.max_eval_samples if split_name == "eval" else data_args.max_train_samples
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        if data_args.tile_size:
            ds = tile_dataset(
                ds, data_args.tile_size, data_args.tile_overlap, data_args.tile_min_visible, data_args.mask_type,
                split_name, num_proc=data_args.preprocessing_num_workers,
            )  # fmt: skip
        elif data_args.object_crop_scale:
            # Point-prompt crops are for training only: evaluation scores the box prompts on the crops they use.
            point_scale = data_args.point_crop_scale if split_name == "train" else None
            ds = crop_objects(
                ds,
                data_args.object_crop_scale,
                data_args.mask_type,
                split_name,
                point_scale=point_scale,
                point_every=data_args.point_crop_every,
                num_proc=data_args.preprocessing_num_workers,
            )
    return index_objects(ds, data_args.label_mask_type, split_name, data_args.preprocessing_num_workers)


def _has_objects(split_name: str):
    def keep(num_objects: int, index: int) -> bool:
        if num_objects == 0:
            logger.warning("Split %r: skipped streamed row %d, whose mask has no object", split_name, index)
        return num_objects > 0

    return keep

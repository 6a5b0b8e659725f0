"""Indexing: every object of every mask with its exact box, and one split prepared as training and evaluation read
it."""

from __future__ import annotations

import logging

import datasets
import numpy as np

from ..config.arguments import DataArguments
from ..core.images import AspectRatioError, check_aspect_ratio, open_image, read_image_header, read_rgb
from ..core.masks import _mask_array, boxes_from_instances, mask_to_instances
from .windows import crop_objects, tile_dataset

logger = logging.getLogger(__name__)


def index_objects(
    ds: datasets.Dataset | datasets.IterableDataset,
    mask_type: str = "auto",
    split_name: str = "train",
    num_proc: int | None = None,
    longest_edge: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Add `boxes` (exact xyxy per object), `areas` (pixels per object), `num_objects` and `row_index` (the row's
    position in `ds`, which keys its prompt randomness in `SamTransform`) columns; drop, count and log images without
    objects, and images too elongated for the model's input.

    Runs as a cached `datasets.map`: each mask is decoded once here and once per use in the transform; of each image
    only the header is read (a float image is decoded, to refuse NaN or infinite pixels). Images and masks are read
    with `sam_hf.core.images` in their displayed orientation (EXIF applied, as `datasets.Image` decodes them later). A
    streamed `IterableDataset` is indexed lazily, as its rows arrive; each image it skips is logged when it is skipped.

    Args:
        ds: rows with `image` and `label` columns.
        mask_type (`str`, *optional*, defaults to `"auto"`): how masks become objects (`mask_to_instances`).
        split_name (`str`, *optional*, defaults to `"train"`): how logs and errors name the split.
        num_proc (`int`, *optional*): processes of the `datasets.map`.
        longest_edge (`int`, *optional*): the side the model's processor resizes an image's longest side to, labels
            included (`sam_hf.core.images.processor_longest_edge(processor, labels=True)`); images whose short side
            would round to 0 px are skipped, counted and logged with the largest aspect ratio the model takes.
    """

    def _index(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        boxes, areas, counts, fits = [], [], [], []
        for image, mask, idx in zip(batch["image"], batch["label"], indices):
            where = f"row {idx} of split {split_name!r}"
            path = image.get("path") if isinstance(image, dict) else None
            what = f"the image of {where}" + (f" ({path})" if path else "")
            header = read_image_header(image, what)  # only its size is needed
            if header.mode == "F":  # float pixels: to_rgb_array refuses NaN or infinite ones, naming the row
                read_rgb(image, what)
            mask = open_image(mask, f"the mask of {where}")
            try:
                mask_arr = _mask_array(mask)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
            if (header.height, header.width) != mask_arr.shape:
                raise ValueError(
                    f"{where}: image is {header.height}x{header.width} (HxW) but mask is "
                    f"{mask_arr.shape[0]}x{mask_arr.shape[1]}; they must have the same size."
                )
            try:
                check_aspect_ratio(header.height, header.width, longest_edge, what)
                fits.append(True)
            except AspectRatioError as err:
                logger.warning("%s Skipped.", err)
                fits.append(False)
            instances = mask_to_instances(mask_arr, mask_type)
            b = boxes_from_instances(instances)
            boxes.append(b.tolist())
            areas.append(np.bincount(instances.ravel(), minlength=len(b) + 1)[1:].tolist())
            counts.append(len(b))
        return {"boxes": boxes, "areas": areas, "num_objects": counts, "row_index": list(indices), _FITS: fits}

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
        features[_FITS] = datasets.Value("bool")
    if isinstance(ds, datasets.IterableDataset):
        ds = ds.map(_index, batched=True, batch_size=16, with_indices=True, features=features)
        ds = ds.filter(_has_objects(split_name), with_indices=True, input_columns=["num_objects", _FITS])
        return ds.remove_columns(_FITS)
    ds = ds.map(
        _index,
        batched=True,
        batch_size=16,
        with_indices=True,
        features=features,
        num_proc=num_proc,
        desc=f"Indexing objects ({split_name})",
    )
    too_elongated = len(ds) - sum(ds[_FITS])
    kept = ds.filter(
        lambda n, fits: n > 0 and fits, input_columns=["num_objects", _FITS], desc=f"Dropping rows ({split_name})"
    ).remove_columns(_FITS)
    skipped = len(ds) - len(kept) - too_elongated
    if skipped:
        logger.warning("Split %r: skipped %d of %d images whose mask has no object", split_name, skipped, len(ds))
    if too_elongated:
        logger.warning(
            "Split %r: skipped %d of %d images too elongated for the model's input (largest aspect ratio %d:1; each "
            "was logged by name when the split was first indexed)",
            split_name,
            too_elongated,
            len(ds),
            2 * longest_edge,
        )
    if len(kept) == 0:
        elongated = f", {too_elongated} were too elongated for the model's input" if too_elongated else ""
        raise ValueError(
            f"Split {split_name!r} is empty after dropping images without objects ({skipped} images "
            f"had no non-zero mask pixel{elongated}). Check --mask_column and --mask_type."
        )
    logger.info("Split %r: %d images, %d objects", split_name, len(kept), sum(kept["num_objects"]))
    for column, feature in decoded.items():
        kept = kept.cast_column(column, feature)
    return kept


#: The temporary column of `index_objects` that marks rows the model's input can hold.
_FITS = "fits_model_input"


def prepare_split(
    ds: datasets.Dataset | datasets.IterableDataset,
    data_args: DataArguments,
    split_name: str,
    longest_edge: int | None = None,
):
    """One split as training and evaluation read it: cut to `--max_train_samples` / `--max_eval_samples`, cut into
    tiles with `--tile_size` or object crops with `--object_crop_scale`, then indexed (`index_objects`) with the
    labels' mask type (`DataArguments.label_mask_type`). The training split also gets `--point_crop_scale` crops.
    With `longest_edge` (`sam_hf.core.images.processor_longest_edge(processor, labels=True)`), rows too elongated for
    the model's input are skipped, counted and logged.

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
    return index_objects(
        ds, data_args.label_mask_type, split_name, data_args.preprocessing_num_workers, longest_edge=longest_edge
    )


def _has_objects(split_name: str):
    def keep(num_objects: int, fits: bool, index: int) -> bool:
        if num_objects == 0 and fits:
            logger.warning("Split %r: skipped streamed row %d, whose mask has no object", split_name, index)
        return num_objects > 0 and fits

    return keep

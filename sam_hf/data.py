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
import io
import logging
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from transformers import SamProcessor
from transformers.image_utils import ChannelDimension

from .family import Geometry

if TYPE_CHECKING:
    from .config import DataArguments

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MASK_TYPES = ("auto", "instance", "binary", "semantic")
LABEL_PAD = -100.0
EMBEDDING_KEYS = ("image_embeddings", "image_digest", "embedding_checksum")

__all__ = [
    "SamDataCollator",
    "SamTransform",
    "boxes_from_instances",
    "check_lossless_mask",
    "encode_images",
    "index_objects",
    "jitter_boxes",
    "load_source",
    "mask_to_instances",
    "object_labels",
    "resize_and_pad_masks",
    "scale_coords",
    "to_rgb_array",
]


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------


def _list_images(folder: Path) -> dict[str, Path]:
    """Image files of `folder` by stem; two files with one stem (`a.png` and `a.jpg`) are refused, not one dropped."""
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(p.stem, []).append(p)
    clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if clashes:
        listed = "; ".join(", ".join(p.name for p in paths) for paths in clashes.values())
        raise ValueError(
            f"{folder} has {len(clashes)} file stem(s) shared by several image files ({listed}); images, masks and "
            "instances are paired by stem, so each stem must name exactly one file. Remove or rename the extra files."
        )
    return {stem: paths[0] for stem, paths in by_stem.items()}


#: Pillow formats that store pixels lossily; a mask in one of them has values that were never labels.
LOSSY_MASK_FORMATS = ("JPEG", "MPO")
_LOSSY_MASK_MESSAGE = (
    "masks must be stored losslessly (PNG/TIFF), JPEG compression creates false objects (it blurs every edge into "
    "values between the labels). Re-export the masks as PNG or TIFF from their original source"
)


def check_lossless_mask(mask: Any, where: str = "mask") -> None:
    """Raise a `ValueError` if `mask` is a PIL image decoded from a lossy format (JPEG).

    JPEG changes pixel values near every edge, so an instance or binary mask read back from a JPEG file has dozens
    of spurious values, each of which would become a false object. Arrays and losslessly decoded images pass.

    Args:
        mask: the mask as given to `mask_to_instances` (a PIL image, or an array, which is not checked).
        where (`str`, *optional*): what to call the mask in the message (a file name or a dataset row).
    """
    fmt = getattr(mask, "format", None) if isinstance(mask, Image.Image) else None
    if fmt in LOSSY_MASK_FORMATS:
        name = getattr(mask, "filename", "") or ""
        source = f" (file {name})" if name and name not in where else ""
        raise ValueError(f"{where}{source} is a {fmt} image: {_LOSSY_MASK_MESSAGE}.")


def _bomb_message(path: Path | str, err: Exception) -> str:
    what = path if isinstance(path, str) else f"Image file {path}"
    return (
        f"{what} is larger than Pillow's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS:,} pixels ({err}). If the image is intended, raise the limit before loading the "
        "data, e.g. `PIL.Image.MAX_IMAGE_PIXELS = 400_000_000` (or None to disable the check) in your launcher; "
        "otherwise remove or downscale the file."
    )


def _check_readable(path: Path) -> tuple[tuple[int, int], str | None]:
    """`((width, height), format)` of an image file, or a `ValueError` naming the file."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                size, fmt = im.size, im.format
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                logger.warning("%s", _bomb_message(path, w.message).replace("If the image", "Pillow accepts it, but"))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return size, fmt
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(_bomb_message(path, err)) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"Cannot read image file {path}: {err}. Expected a readable image file.") from err


def load_image_folder(folder: str | os.PathLike) -> datasets.Dataset:
    """Read a folder with `images/`, `masks/` and an optional `instances/` into a `Dataset`.

    The three sub-folders share file stems. When `instances/` exists, its integer instance maps (0 = background)
    are used as masks, otherwise the binary masks of `masks/`. Every pair is checked up front: stems without a
    partner, files that cannot be read, images beyond Pillow's decompression-bomb limit, masks stored as JPEG (whatever
    their extension: lossy compression creates false objects), two files sharing a stem, and images whose size
    differs from their mask raise a `ValueError` naming the file.

    Returns:
        `datasets.Dataset` with columns `image`, `label` (both `datasets.Image`) and `file_name` (the stem).
    """
    folder = Path(folder)
    image_dir = folder / "images"
    if not image_dir.is_dir():
        raise ValueError(f"{folder} has no images/ sub-folder; expected images/ and masks/ (or instances/).")
    mask_dir = folder / "instances" if (folder / "instances").is_dir() else folder / "masks"
    if not mask_dir.is_dir():
        raise ValueError(f"{folder} has neither instances/ nor masks/; expected one of them beside images/.")
    images, masks = _list_images(image_dir), _list_images(mask_dir)
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise ValueError(
            f"Mask file {masks[orphans[0]]} has no image in {image_dir} (same stem expected); "
            f"{len(orphans)} mask file(s) without an image in total."
        )
    missing = sorted(set(images) - set(masks))
    if missing:
        raise ValueError(
            f"Image file {images[missing[0]]} has no mask in {mask_dir} (same stem expected); "
            f"{len(missing)} image file(s) without a mask in total."
        )
    if not images:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) found in {image_dir}.")
    for stem in images:
        (image_size, _), (mask_size, mask_format) = _check_readable(images[stem]), _check_readable(masks[stem])
        if mask_format in LOSSY_MASK_FORMATS:
            lossy = [masks[s] for s in masks if _check_readable(masks[s])[1] in LOSSY_MASK_FORMATS]
            raise ValueError(
                f"Mask file {masks[stem]} is stored as {mask_format}: {_LOSSY_MASK_MESSAGE}. "
                f"{len(lossy)} of {len(masks)} file(s) in {mask_dir} are {'/'.join(LOSSY_MASK_FORMATS)}."
            )
        if image_size != mask_size:
            raise ValueError(
                f"Image {images[stem]} is {image_size[0]}x{image_size[1]} (WxH) but its mask "
                f"{masks[stem]} is {mask_size[0]}x{mask_size[1]}; they must have the same size."
            )
    stems = sorted(images)
    ds = datasets.Dataset.from_dict(
        {"image": [str(images[s]) for s in stems], "label": [str(masks[s]) for s in stems], "file_name": stems}
    )
    logger.info("Read %d image/mask pairs from %s (masks from %s/)", len(stems), folder, mask_dir.name)
    return ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image())


def load_source(
    dataset_name: str,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    mask_column: str = "label",
    cache_dir: str | None = None,
    token: str | None = None,
    streaming: bool = False,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load a Hub dataset id, a `save_to_disk` directory, an images/masks folder, or COCO instance annotations (a
    json file, or a folder holding `instances.json`; see `sam_hf.coco.load_coco`) as a `DatasetDict`.

    With `streaming=True`, an `IterableDatasetDict` instead: a Hub dataset is streamed (nothing is downloaded ahead),
    a local source is read row by row (`Dataset.to_iterable_dataset`).

    The returned splits have the columns `image` and `label` (renamed from `image_column` / `mask_column`). A name
    that does not exist locally is looked up on the Hub only if it is a valid Hub id (`name` or `user/name`, checked
    with `huggingface_hub`'s `validate_repo_id`) whose first part is not a local directory; anything else, such as
    `./data`, `/data/cells`, `~/cells`, `data/cells/v2` or `data/typo` next to an existing `data/`, raises
    `FileNotFoundError` at once.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(dataset_name)
    if not path.exists():
        try:
            validate_repo_id(dataset_name)
            # `data/typo` is a mistyped local path when `data/` is a local directory, not a dataset of Hub user `data`.
            local_parent = "/" in dataset_name and Path(dataset_name.split("/", 1)[0]).is_dir()
            why = f"{dataset_name.split('/', 1)[0]}/ is a local directory, so it is not read as a Hub dataset id"
        except HFValidationError:
            local_parent, why = True, "it is not a Hub dataset id, which reads `name` or `user/name`"
        if local_parent:
            raise FileNotFoundError(
                f"--dataset_name {dataset_name}: the path {path.expanduser().absolute()} does not exist ({why}). "
                "Expected a Hub dataset id, a directory written by save_to_disk, or a folder with images/ and masks/."
            )
    from .coco import find_coco_file, load_coco

    coco_file = find_coco_file(path)
    if coco_file is not None:
        dsd = datasets.DatasetDict({"train": load_coco(coco_file)})
        image_column, mask_column = "image", "label"
    elif path.is_dir() and (path / "images").is_dir():
        dsd = datasets.DatasetDict({"train": load_image_folder(path)})
        image_column, mask_column = "image", "label"
    elif path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(str(path))
        dsd = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    elif path.exists():
        raise ValueError(
            f"--dataset_name {dataset_name} is a path but neither a folder with images/ and masks/, a COCO "
            "instances.json (or a folder holding one), nor a directory written by save_to_disk."
        )
    else:
        dsd = datasets.load_dataset(
            dataset_name, dataset_config_name, cache_dir=cache_dir, token=token, streaming=streaming
        )
    if streaming and isinstance(dsd, datasets.DatasetDict):
        # Several shards, so that several dataloader workers can read the stream.
        dsd = datasets.IterableDatasetDict(
            {split: ds.to_iterable_dataset(num_shards=min(len(ds), 64)) for split, ds in dsd.items()}
        )
    for split, ds in dsd.items():
        for arg, column in (("--image_column", image_column), ("--mask_column", mask_column)):
            if ds.column_names is not None and column not in ds.column_names:
                raise ValueError(
                    f"{arg} {column!r} is not a column of split {split!r} of {dataset_name}; "
                    f"available columns: {', '.join(ds.column_names)}."
                )
        if image_column != "image" or mask_column != "label":
            ds = ds.rename_columns({k: v for k, v in ((image_column, "image"), (mask_column, "label")) if k != v})
        dsd[split] = ds
    return dsd


def split_source(
    dsd: datasets.DatasetDict,
    train_split: str = "train",
    eval_split: str | None = "validation",
    validation_split_percentage: float = 20.0,
    seed: int = 42,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Return the train and eval splits, carving a seeded eval split out of train when `eval_split` is missing."""
    if train_split not in dsd:
        raise ValueError(f"--train_split {train_split!r} is not a split of the dataset; splits: {', '.join(dsd)}.")
    train = dsd[train_split]
    if eval_split and eval_split in dsd:
        return train, dsd[eval_split]
    if not validation_split_percentage:
        return train, None
    n_eval = max(1, round(len(train) * validation_split_percentage / 100))
    if n_eval >= len(train):
        raise ValueError(
            f"--validation_split_percentage {validation_split_percentage} leaves no training images "
            f"out of {len(train)}."
        )
    parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    logger.info("No %r split: held out %d of %d images (seed %d) for evaluation", eval_split, n_eval, len(train), seed)
    return parts["train"], parts["test"]


# --------------------------------------------------------------------------------------------------------------------
# Masks -> objects -> boxes
# --------------------------------------------------------------------------------------------------------------------


def to_rgb_array(image: Any) -> np.ndarray:
    """Convert a PIL image or array (grayscale, RGBA, 16-bit, float) to an `(H, W, 3)` uint8 array."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = np.asarray(image)
        else:
            # A writable copy: a view of PIL's buffer is read-only, and processors wrap it with torch.from_numpy.
            return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo) * 255 + 0.5).astype(np.uint8) if hi > lo else np.zeros(arr.shape, np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"Expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}.")
    return np.ascontiguousarray(arr)


def encode_images(image_processor: Any, images: Any, **kwargs: Any) -> Any:
    """Run a SAM image processor on `(H, W, 3)` arrays (one, or a list), telling it the channels come last.

    Without `input_data_format`, transformers guesses the channel axis from the shape and reads an image 1, 3 or 4
    pixels high as channels-first: a 4x64 image becomes "64x3". Every (H, W, 3) array that meets an image processor
    in sam_hf goes through here.

    Returns:
        The processor's `BatchFeature` (`pixel_values`, `original_sizes`, `reshaped_input_sizes`) as torch tensors.
        Processors that resize to the square input without padding (SAM 2) report no `reshaped_input_sizes`; it is
        then the input's own size.
    """
    enc = image_processor(images=images, input_data_format=ChannelDimension.LAST, return_tensors="pt", **kwargs)
    if "reshaped_input_sizes" not in enc:
        n, side = enc["pixel_values"].shape[0], enc["pixel_values"].shape[-2:]
        enc["reshaped_input_sizes"] = torch.tensor([list(side)] * n)
    return enc


def _mask_array(mask: Any) -> np.ndarray:
    check_lossless_mask(mask)
    arr = np.asarray(mask)
    if arr.ndim == 3:
        if not (arr[..., :1] == arr).all():
            raise ValueError(f"Expected a single-channel mask, got shape {arr.shape} with differing channels.")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"Expected a 2-D mask, got shape {arr.shape}.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(
            f"The mask has {int((~np.isfinite(arr)).sum())} NaN or infinite value(s); expected finite labels "
            "(0 = background)."
        )
    return arr


def mask_to_instances(mask: Any, mask_type: str = "auto") -> np.ndarray:
    """Turn a mask into an instance map: `(H, W)` int32 with ids 1..N for the N objects and 0 for background.

    Args:
        mask: an `(H, W)` array or PIL image.
        mask_type (`str`, *optional*, defaults to `"auto"`):
            - `"instance"`: every non-zero value is one object.
            - `"binary"`: every 4-connected component of non-zero pixels is one object.
            - `"semantic"`: every connected component of every non-zero class is one object.
            - `"auto"`: `"binary"` when the mask has a single non-zero value, `"instance"` otherwise.

    Any dtype works (bool, integers, floats; ids need not be contiguous). Raises a `ValueError` for a mask that is
    not 2-D (or 3-D with identical channels), a float mask with NaN or infinite values, a mask decoded from JPEG
    (see `check_lossless_mask`), or an unknown `mask_type`.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}.")
    arr = _mask_array(mask)
    values = np.unique(arr)
    values = values[values != 0]
    if mask_type == "auto":
        mask_type = "binary" if len(values) <= 1 else "instance"
    if mask_type == "instance":
        ids = np.searchsorted(values, arr).astype(np.int32) + 1
        return np.where(arr != 0, ids, 0).astype(np.int32)
    if mask_type == "binary":
        return ndimage.label(arr != 0)[0].astype(np.int32)
    out = np.zeros(arr.shape, np.int32)
    for value in values:
        components, _ = ndimage.label(arr == value)
        out[components > 0] = components[components > 0] + out.max()
    return out


def boxes_from_instances(instances: np.ndarray) -> np.ndarray:
    """Exact xyxy boxes `(N, 4)` in pixel coordinates of an instance map with ids 1..N.

    Coordinates are those of the outermost object pixels: `[x_min, y_min, x_max, y_max]`, inclusive.
    """
    n = int(instances.max()) if instances.size else 0
    boxes = np.zeros((n, 4), np.float32)
    for i, slc in enumerate(ndimage.find_objects(instances, max_label=n)):
        if slc is None:
            raise ValueError(f"Instance id {i + 1} is missing from an instance map with ids up to {n}.")
        boxes[i] = (slc[1].start, slc[0].start, slc[1].stop - 1, slc[0].stop - 1)
    return boxes


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
            from .tiling import tile_dataset  # tiling builds on this module

            ds = tile_dataset(
                ds, data_args.tile_size, data_args.tile_overlap, data_args.tile_min_visible, data_args.mask_type,
                split_name, num_proc=data_args.preprocessing_num_workers,
            )  # fmt: skip
        elif data_args.object_crop_scale:
            from .tiling import crop_objects

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


def _open_entry(entry: Any, what: str, load: bool = True) -> Any:
    """A PIL image from a `datasets.Image(decode=False)` value, with the decompression-bomb check naming `what`;
    anything else (decoded images, arrays) is returned as it is."""
    if not (isinstance(entry, dict) and ("bytes" in entry or "path" in entry)):
        return entry
    source = io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(source)  # reads the header, where Pillow checks the size
            if load:
                image.load()
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                logger.warning("%s", _bomb_message(what, w.message).replace("If the image", "Pillow accepts it, but"))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(_bomb_message(what, err)) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{what} cannot be decoded: {err}. Expected a readable image.") from err


def _has_objects(split_name: str):
    def keep(num_objects: int, index: int) -> bool:
        if num_objects == 0:
            logger.warning("Split %r: skipped streamed row %d, whose mask has no object", split_name, index)
        return num_objects > 0

    return keep


# --------------------------------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------------------------------


def resized_shape(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The `(H, W)` that `SamImageProcessor` resizes an image to: longest side `longest_edge`, aspect kept."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


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

    When the dataset carries cached `image_embeddings` (see `sam_hf.cache`), they replace `pixel_values` and no image
    is decoded; each row's checksum is verified as it is read (`sam_hf.cache.EmbeddingCacheError` when it fails).

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
        from .cache import read_embedding

        cached = "image_embeddings" in batch
        image_key = "image_embeddings" if cached else "pixel_values"
        keys = (image_key, "input_boxes", "labels", "original_sizes", "reshaped_input_sizes")
        out: dict[str, list] = {k: [] for k in keys}
        if self.with_instances:
            out["instances"], out["object_ids"] = [], []
        if self.point_prompts:
            out["input_points"], out["input_labels"] = [], []
        if self.background_points:
            out["background_points"], out["background_labels"] = [], []
        point_rows = self.train and "point_only" in batch
        if point_rows:
            out["point_only"], out["point_labels"] = [], []
        for row in range(len(batch["boxes"])):
            if cached:
                # Image side from the embedding cache: no image decoding at all.
                out[image_key].append(read_embedding({k: batch[k][row] for k in EMBEDDING_KEYS if k in batch}))
                original_size = tuple(int(v) for v in batch["original_sizes"][row])
                reshaped_size = tuple(int(v) for v in batch["reshaped_input_sizes"][row])
            else:
                enc = encode_images(self.processor.image_processor, to_rgb_array(batch["image"][row]))
                out[image_key].append(enc["pixel_values"][0])
                original_size = tuple(int(v) for v in enc["original_sizes"][0])
                reshaped_size = tuple(int(v) for v in enc["reshaped_input_sizes"][0])
            instances = mask_to_instances(batch["label"][row], self.mask_type)
            rng = self.row_rng(self._row_key(batch, row))
            keep = self.select(len(batch["boxes"][row]), rng)
            exact = np.asarray(batch["boxes"][row], np.float32)[keep]
            boxes = jitter_boxes(exact, self.box_jitter, original_size, rng) if self.box_jitter else exact
            ids = torch.from_numpy(keep + 1)
            inst = torch.from_numpy(instances)
            out["input_boxes"].append(scale_coords(boxes, original_size, reshaped_size))
            if self.point_prompts:
                points = self.sample_points(instances, keep + 1, rng)
                out["input_points"].append(scale_coords(points, original_size, reshaped_size)[:, None])
                out["input_labels"].append(torch.ones(len(keep), 1, dtype=torch.long))
            if self.background_points:
                where = self.sample_background(batch, row, instances, rng)
                found = where is not None
                where = where if found else np.zeros((1, 2))
                out["background_points"].append(scale_coords(where, original_size, reshaped_size)[None])
                out["background_labels"].append(torch.tensor([[1 if found else -10]], dtype=torch.long))
            label_shape = self.geometry.label_shape(*instances.shape)
            labels = object_labels(instances, exact, keep + 1, label_shape, self.geometry.mask_side)
            if point_rows:
                point_only = bool(batch["point_only"][row])
                out["point_only"].append(torch.tensor(point_only))
                out["point_labels"].append(labels)
                labels = torch.full_like(labels, LABEL_PAD) if point_only else labels
            out["labels"].append(labels)
            out["original_sizes"].append(torch.tensor(original_size))
            out["reshaped_input_sizes"].append(torch.tensor(reshaped_size))
            if self.with_instances:
                out["instances"].append(inst)
                out["object_ids"].append(ids)
        return out


def scale_coords(coords: Any, original_size: tuple[int, int], reshaped_size: tuple[int, int]) -> torch.Tensor:
    """Map pixel coordinates from the original image to the resized input frame, as `SamProcessor` does.

    `coords` ends in xy pairs: `(..., 2)` points or `(..., 4)` xyxy boxes.
    """
    (old_h, old_w), (new_h, new_w) = original_size, reshaped_size
    coords = np.asarray(coords, np.float64)
    if coords.ndim == 0 or coords.shape[-1] not in (2, 4):
        raise ValueError(f"Expected coordinates of shape (..., 2) or (..., 4), got {coords.shape}.")
    factors = np.tile([new_w / old_w, new_h / old_h], coords.shape[-1] // 2)
    return torch.from_numpy(coords * factors).float()


def _stack_levels(items: list[Any]) -> Any:
    """Stack per-example image inputs: tensors, or tuples of feature levels (SAM-HQ, SAM 2) stacked level by level."""
    if isinstance(items[0], (list, tuple)):
        return [torch.stack(level) for level in zip(*items)]
    return torch.stack(items)


@dataclass
class SamDataCollator:
    """Stack examples from `SamTransform`, padding the number of objects to the batch maximum.

    Padded objects get an all-zero box (and point), `-100` labels and object id 0. Instance maps are padded with
    background to the largest image of the batch.

    Args:
        pad_to_multiple_of (`int`, *optional*): pad the number of objects up to a multiple of this, so that batches
            take few distinct shapes (`torch.compile` then compiles once instead of once per object count).
    """

    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        k = max(f["input_boxes"].shape[0] for f in features)
        if self.pad_to_multiple_of:
            k = -(-k // self.pad_to_multiple_of) * self.pad_to_multiple_of
        m = features[0]["labels"].shape[-1]
        image_key = "image_embeddings" if "image_embeddings" in features[0] else "pixel_values"
        batch = {
            image_key: _stack_levels([f[image_key] for f in features]),
            "input_boxes": torch.zeros(len(features), k, 4),
            "labels": torch.full((len(features), k, m, m), LABEL_PAD),
            "original_sizes": torch.stack([f["original_sizes"] for f in features]),
            "reshaped_input_sizes": torch.stack([f["reshaped_input_sizes"] for f in features]),
        }
        if "input_points" in features[0]:
            batch["input_points"] = torch.zeros(len(features), k, 1, 2)
            batch["input_labels"] = torch.ones(len(features), k, 1, dtype=torch.long)
        if "point_labels" in features[0]:
            batch["point_labels"] = torch.full((len(features), k, m, m), LABEL_PAD)
            batch["point_only"] = torch.stack([f["point_only"] for f in features])
        if "background_points" in features[0]:
            batch["background_points"] = torch.stack([f["background_points"] for f in features])
            batch["background_labels"] = torch.stack([f["background_labels"] for f in features])
        for i, f in enumerate(features):
            n = f["input_boxes"].shape[0]
            batch["input_boxes"][i, :n] = f["input_boxes"]
            batch["labels"][i, :n] = f["labels"]
            if "input_points" in f:
                batch["input_points"][i, :n] = f["input_points"]
            if "point_labels" in f:
                batch["point_labels"][i, :n] = f["point_labels"]
        if "instances" in features[0]:
            h = max(f["instances"].shape[0] for f in features)
            w = max(f["instances"].shape[1] for f in features)
            batch["instances"] = torch.zeros(len(features), h, w, dtype=torch.int32)
            batch["object_ids"] = torch.zeros(len(features), k, dtype=torch.int32)
            for i, f in enumerate(features):
                hh, ww = f["instances"].shape
                batch["instances"][i, :hh, :ww] = f["instances"]
                batch["object_ids"][i, : f["object_ids"].shape[0]] = f["object_ids"]
        return batch

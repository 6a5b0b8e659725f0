"""Sources: a Hub dataset, a save_to_disk directory, an images/masks folder or COCO, as a DatasetDict."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..core.images import list_images, read_image_header
from ..core.masks import _LOSSY_MASK_MESSAGE, LOSSY_MASK_FORMATS
from .coco import find_coco_file, load_coco

logger = logging.getLogger(__name__)


def load_image_folder(folder: str | os.PathLike) -> datasets.Dataset:
    """Read a folder with `images/`, `masks/` and an optional `instances/` into a `Dataset`.

    The three sub-folders share file stems. When `instances/` exists, its integer instance maps (0 = background)
    are used as masks, otherwise the binary masks of `masks/`. Every pair is checked up front: stems without a
    partner, files that cannot be read, images beyond Pillow's decompression-bomb limit, masks stored as JPEG (whatever
    their extension: lossy compression creates false objects), two files sharing a stem, and images whose size
    differs from their mask raise a `ValueError` naming the file. Sizes are compared as displayed: a photo whose EXIF
    says "rotate 90" is as wide as a viewer shows it, and `datasets.Image` decodes it in that orientation.

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
    images = {p.stem: p for p in list_images(image_dir)}
    masks = {p.stem: p for p in list_images(mask_dir)}
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
    for stem in images:
        # Sizes as displayed (EXIF orientation applied), as `datasets.Image` decodes both files for training.
        image, mask = read_image_header(images[stem], verify=True), read_image_header(masks[stem], verify=True)
        if mask.format in LOSSY_MASK_FORMATS:
            lossy = [m for m in masks.values() if read_image_header(m).format in LOSSY_MASK_FORMATS]
            raise ValueError(
                f"Mask file {masks[stem]} is stored as {mask.format}: {_LOSSY_MASK_MESSAGE}. "
                f"{len(lossy)} of {len(masks)} file(s) in {mask_dir} are {'/'.join(LOSSY_MASK_FORMATS)}."
            )
        if (image.width, image.height) != (mask.width, mask.height):
            turned = (image.width, image.height) == (mask.height, mask.width)
            hint = " Sizes are as displayed, with the EXIF orientation applied as viewers and `datasets` apply it: "
            raise ValueError(
                f"Image {images[stem]} is {image.width}x{image.height} (WxH) but its mask "
                f"{masks[stem]} is {mask.width}x{mask.height}; they must have the same size."
                + (hint + "draw the mask on the image as it is shown." if turned else "")
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
    json file, or a folder holding `instances.json`; see `sam_hf.data.load_coco`) as a `DatasetDict`.

    With `streaming=True`, an `IterableDatasetDict` instead: a Hub dataset is streamed (nothing is downloaded ahead),
    a local source is read row by row (`Dataset.to_iterable_dataset`).

    The returned splits have the columns `image` and `label` (renamed from `image_column` / `mask_column`). A name
    that does not exist locally is looked up on the Hub only if it is a valid Hub id (`name` or `user/name`, checked
    with `huggingface_hub`'s `validate_repo_id`) whose first part is not a local directory; anything else, such as
    `./data`, `/data/cells`, `~/cells`, `data/cells/v2` or `data/typo` next to an existing `data/`, raises
    `FileNotFoundError` at once.
    """
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

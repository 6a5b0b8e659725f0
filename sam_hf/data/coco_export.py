"""Writing a dataset as COCO instance annotations."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..core.images import to_rgb_array
from ..core.masks import mask_to_instances
from ..core.rle import encode_rle
from .coco import COCO_FILE, _image_size
from .sources import load_source

logger = logging.getLogger(__name__)


def write_coco(
    source: str | os.PathLike | datasets.Dataset,
    output_dir: str | os.PathLike,
    mask_type: str = "auto",
    split: str = "train",
    overwrite: bool = False,
) -> Path:
    """Write a dataset as COCO: `output_dir/instances.json` (compressed RLE, one annotation per object) and the
    images in `output_dir/images/`, which `load_coco(output_dir)` reads back.

    Args:
        source: a `Dataset` with `image` and `label` columns, or anything `--dataset_name` accepts (its `split`).
        output_dir (`str` or `os.PathLike`): a new or empty folder; one that holds files is refused unless
            `overwrite`, which replaces `instances.json` and `images/` and keeps the rest.
        mask_type (`str`, *optional*, defaults to `"auto"`): how masks become objects (see `mask_to_instances`).
        split (`str`, *optional*, defaults to `"train"`): the split of a `--dataset_name` source.

    Returns:
        `Path` of the json file. Each image gets the single category `{"id": 1, "name": "object"}`.
    """
    if not isinstance(source, datasets.Dataset):
        source = load_source(os.fspath(source))[split]
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already holds files; pass overwrite=True or choose another folder.")
        if (out / "images").is_dir():
            shutil.rmtree(out / "images")
        (out / COCO_FILE).unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    source = source.cast_column("image", datasets.Image(decode=False)) if "image" in source.features else source
    images, annotations, used = [], [], set()
    for idx in tqdm(range(len(source)), desc="Writing COCO", unit="image"):
        row = source[idx]
        stem = str(row.get("file_name") or f"image_{idx:06d}")
        entry = row["image"]
        name = f"{stem}{Path(entry['path']).suffix.lower()}" if entry.get("path") else f"{stem}.png"
        if name in used:
            raise ValueError(f"Row {idx}: two images would both be written as {name}; their file_name must differ.")
        used.add(name)
        target = out / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.get("bytes") is None and entry.get("path") and Path(entry["path"]).is_file():
            shutil.copyfile(entry["path"], target)
            pixels_size = _image_size(target)
        else:
            array = to_rgb_array(Image.open(io.BytesIO(entry["bytes"])))
            Image.fromarray(array).save(target.with_suffix(".png"))
            name, pixels_size = str(Path(name).with_suffix(".png")), array.shape[:2]
        instances = mask_to_instances(row["label"], mask_type)
        if instances.shape != tuple(pixels_size):
            raise ValueError(f"Row {idx} ({name}): the mask is {instances.shape} but the image is {pixels_size}.")
        image_id = idx + 1
        images.append({"id": image_id, "file_name": name, "height": int(pixels_size[0]), "width": int(pixels_size[1])})
        for obj in range(1, int(instances.max()) + 1):
            mask = instances == obj
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": encode_rle(mask),
                    "area": int(mask.sum()),
                    # COCO boxes are [x, y, width, height] around the pixels (pixel (i, j) covers [i, i + 1)).
                    "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": "written by sam_hf.data.write_coco"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }
    path = out / COCO_FILE
    path.write_text(json.dumps(coco, separators=(",", ":")))
    logger.info("Wrote %d images and %d annotations as COCO to %s", len(images), len(annotations), path)
    return path

"""COCO instance annotations as a `--dataset_name` source, and datasets written back as COCO.

`load_coco` reads a COCO `instances.json` (polygons, uncompressed RLE and compressed RLE; no pycocotools needed) and
returns exactly what `sam_hf.data.sources.load_image_folder` returns for a folder of images and instance maps: a
`Dataset` with `image`, `label` (a 16-bit instance map per image, one id per annotation) and `file_name` columns, which
`index_objects`, training and evaluation read unchanged.

```python
from sam_hf.data.coco import load_coco

ds = load_coco("my_coco")                        # my_coco/instances.json + my_coco/images/<file_name>
ds = load_coco("exports/_annotations.coco.json")  # or an explicit json; images beside it or in images/
```

`write_coco` goes the other way: any source `load_source` reads becomes `instances.json` + `images/`.

Conventions (those of pycocotools):

- A polygon `[x0, y0, x1, y1, ...]` is in continuous pixel coordinates, pixel `(i, j)` covering `[i, i + 1) x
  [j, j + 1)`; a pixel belongs to the polygon when its centre `(i + 0.5, j + 0.5)` lies inside it (even-odd rule;
  a point on a left or top edge is inside, on a right or bottom edge outside). The square `[10, 10, 20, 10, 20, 20,
  10, 20]` is the 100 pixels of columns and rows 10 to 19. An annotation with several polygons is their union.
- RLE runs count pixels in column-major order, alternating background and foreground, starting with background.
  Compressed RLE is pycocotools' string form (LEB128-like 5-bit groups offset by 48, counts from the fourth on stored
  as the difference to the count two places earlier).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.masks import paint_masks
from ..core.rle import _is_int, _short, decode_rle, polygons_to_mask, rle_size

logger = logging.getLogger(__name__)


#: File name of the annotations in a COCO directory source.
COCO_FILE = "instances.json"


#: How many ids or names a log line lists before "...".
_LISTED = 5


def annotation_mask(annotation: dict[str, Any], height: int, width: int, where: str = "annotation") -> np.ndarray:
    """The `(H, W)` bool mask of a COCO annotation's `segmentation` (polygons, uncompressed or compressed RLE).

    Raises:
        ValueError: naming `where` for a missing or malformed segmentation: polygons that are not lists of at least
            3 finite `x, y` pairs, or RLE whose size is not the image's `[H, W]` or whose runs do not sum to `H * W`.
    """
    if "segmentation" not in annotation:
        raise ValueError(
            f"{where} has no 'segmentation'; expected polygons [[x0, y0, x1, y1, ...], ...] or RLE {{'size': [H, W], "
            "'counts': ...}} (boxes alone give no mask)."
        )
    seg = annotation["segmentation"]
    if isinstance(seg, dict):
        try:
            if rle_size(seg) != (height, width):  # checked before anything is decoded
                raise ValueError(f"RLE 'size' is {_short(seg['size'])} but the image is [{height}, {width}] ([H, W])")
            return decode_rle(seg)
        except ValueError as err:
            raise ValueError(f"{where}: {err}.") from err
    if not isinstance(seg, list) or not seg:
        raise ValueError(
            f"{where}: 'segmentation' must be a non-empty list of polygons [[x0, y0, x1, y1, ...], ...] or an RLE "
            f"object {{'size': [H, W], 'counts': ...}}, got {_short(seg)}."
        )
    for k, polygon in enumerate(seg):
        ok = isinstance(polygon, list) and all(_is_number(v) for v in polygon)
        if not ok or len(polygon) < 6 or len(polygon) % 2:
            raise ValueError(
                f"{where}: polygon {k} must be a flat list of at least 3 x, y pairs [x0, y0, x1, y1, x2, y2, ...] "
                f"(an even number >= 6 of finite numbers), got {_short(polygon)}."
            )
    return polygons_to_mask(seg, height, width)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _listed(items: list[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _LISTED else "")


def find_coco_file(path: str | os.PathLike) -> Path | None:
    """The COCO annotation file that `--dataset_name path` names, or `None` if `path` is not a COCO source.

    `path` is a COCO source when it is a `.json` file, or a directory holding `instances.json` and neither a `masks/`
    nor an `instances/` sub-folder. A directory with both is read as an image folder, as it was before COCO sources
    existed; a log line says so, and passing the json path itself reads the COCO annotations instead.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return path
    if path.is_dir() and (path / COCO_FILE).is_file():
        folders = [name for name in ("masks", "instances") if (path / name).is_dir()]
        if (path / "images").is_dir() and folders:
            logger.warning(
                "%s holds %s and %s/: reading it as an image folder. Pass --dataset_name %s to read the COCO "
                "annotations instead.",
                path,
                COCO_FILE,
                "/ and ".join(folders),
                path / COCO_FILE,
            )
            return None
        return path / COCO_FILE
    return None


@dataclass
class CocoIndex:
    """What `index_coco` found in a COCO file, after checking it.

    Attributes:
        json_path (`Path`): the annotation file.
        image_root (`Path`): the folder that the images' `file_name`s are relative to.
        images (`list[dict]`): the usable images (listed, file present), each with `id`, `path`, `file_name`,
            `height`, `width` and `annotations` (its non-crowd annotations, in file order).
        num_annotations (`int`): annotations in the file.
        crowd (`list`): ids of crowd annotations (`iscrowd: 1`), skipped: a crowd region is many objects.
        orphans (`list`): ids of annotations whose `image_id` is not an image of the file, skipped.
        missing_files (`list`): `file_name`s of listed images not found under `image_root`, skipped with their
            annotations (`missing_annotations` of them).
        unannotated (`list`): `file_name`s of images without a non-crowd annotation; kept, with an empty mask, so
            `index_objects` skips and counts them like empty masks of an image folder.
    """

    json_path: Path
    image_root: Path
    images: list[dict[str, Any]] = field(default_factory=list)
    num_annotations: int = 0
    crowd: list[Any] = field(default_factory=list)
    orphans: list[Any] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    missing_annotations: int = 0
    unannotated: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"COCO file {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})."
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO file {path} cannot be read: {err}.") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path} is not a COCO instances file: expected a JSON object with an 'images' list and an "
            f"'annotations' list, got {got}."
        )
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"COCO file {path}: 'annotations' must be a list, got {type(data['annotations']).__name__}.")
    return data


def _image_size(path: Path) -> tuple[int, int]:
    """`(height, width)` of an image file from its header."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"Cannot read image file {path}: {err}. Expected a readable image file.") from err


def index_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> CocoIndex:
    """Read and check a COCO instances file; group its annotations by image.

    Args:
        path (`str` or `os.PathLike`): the json file, or a directory holding `instances.json`.
        image_root (`str` or `os.PathLike`, *optional*): the folder `file_name`s are relative to. By default the
            first of `<json dir>/images` and `<json dir>` under which any listed image exists.

    Every annotation of a usable image is checked here (see `annotation_mask`), so a malformed one fails before any
    work is done, with a `ValueError` naming the file, the annotation id, the image id and what was expected.
    Crowd annotations, annotations of unknown images, images whose file is missing and images without annotations
    are counted in the returned `CocoIndex` and logged, never dropped silently.
    """
    path = Path(path)
    json_path = path / COCO_FILE if path.is_dir() else path
    if not json_path.is_file():
        raise FileNotFoundError(f"COCO file {json_path} does not exist.")
    data = _read_json(json_path)

    images: dict[Any, dict[str, Any]] = {}
    for k, entry in enumerate(data["images"]):
        where = f"{json_path}: images[{k}]"
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise ValueError(f"{where} must be an object with 'id' and 'file_name' (a string), got {_short(entry)}.")
        if entry["id"] in images:
            raise ValueError(f"{where}: image id {entry['id']!r} is listed twice; image ids must be unique.")
        for key in ("height", "width"):
            if key in entry and not (_is_int(entry[key]) and entry[key] > 0):
                raise ValueError(f"{where} (image id {entry['id']!r}): '{key}' must be a positive integer.")
        images[entry["id"]] = entry

    candidates = [Path(image_root)] if image_root is not None else [json_path.parent / "images", json_path.parent]
    found = [sum((root / e["file_name"]).is_file() for e in images.values()) for root in candidates]
    if images and max(found) == 0:
        first = next(iter(images.values()))["file_name"]
        raise ValueError(
            f"None of the {len(images)} images listed in {json_path} exists under "
            f"{' or '.join(str(c) for c in candidates)} (e.g. {first}). Expected the images' file_name relative to "
            f"{json_path.parent / 'images'} or {json_path.parent}."
        )
    root = candidates[int(np.argmax(found))] if images else candidates[0]
    index = CocoIndex(json_path=json_path, image_root=root)

    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    seen_ids: set[Any] = set()
    for k, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ValueError(f"{json_path}: annotations[{k}] must be an object with an 'image_id', got {_short(ann)}.")
        ann_id = ann.get("id", f"#{k}")
        if ann_id in seen_ids:
            raise ValueError(f"{json_path}: annotation id {ann_id!r} is used twice; annotation ids must be unique.")
        seen_ids.add(ann_id)
        index.num_annotations += 1
        if ann.get("iscrowd", 0) not in (0, 1, False, True):
            raise ValueError(
                f"{json_path}: annotation {ann_id!r} (image {ann['image_id']!r}): 'iscrowd' must be 0 or 1, got "
                f"{_short(ann['iscrowd'])}."
            )
        if ann["image_id"] not in images:
            index.orphans.append(ann_id)
        elif ann.get("iscrowd", 0):
            index.crowd.append(ann_id)
        else:
            by_image[ann["image_id"]].append({**ann, "id": ann_id})

    for image_id, entry in images.items():
        file_path = root / entry["file_name"]
        if not file_path.is_file():
            index.missing_files.append(entry["file_name"])
            index.missing_annotations += len(by_image.get(image_id, []))
            continue
        height, width = _image_size(file_path)
        if (entry.get("height", height), entry.get("width", width)) != (height, width):
            raise ValueError(
                f"{json_path}: image {image_id!r} ({file_path}) is {height}x{width} (HxW) but the file lists "
                f"height {entry.get('height')} and width {entry.get('width')}; they must agree."
            )
        anns = by_image.get(image_id, [])
        for ann in anns:
            where = f"{json_path}: annotation {ann['id']!r} (image {image_id!r}, {entry['file_name']})"
            annotation_mask(ann, height, width, where)  # checks it; the mask is made again when the label is
        if not anns:
            index.unannotated.append(entry["file_name"])
        index.images.append(
            {
                "id": image_id,
                "file_name": entry["file_name"],
                "path": file_path,
                "height": height,
                "width": width,
                "annotations": anns,
            }
        )
    _log_index(index)
    if not index.images:
        raise ValueError(
            f"{json_path} has no usable image: {len(images)} listed, {len(index.missing_files)} of them missing "
            f"under {root}."
        )
    return index


def _log_index(index: CocoIndex) -> None:
    name = index.json_path
    if index.crowd:
        logger.warning(
            "%s: skipped %d crowd annotation(s) (iscrowd=1; a crowd region is many objects, not one): ids %s",
            name,
            len(index.crowd),
            _listed(index.crowd),
        )
    if index.orphans:
        logger.warning(
            "%s: skipped %d annotation(s) whose image_id is not an image of the file: ids %s",
            name,
            len(index.orphans),
            _listed(index.orphans),
        )
    if index.missing_files:
        logger.warning(
            "%s: skipped %d listed image(s) not found under %s, with their %d annotation(s): %s",
            name,
            len(index.missing_files),
            index.image_root,
            index.missing_annotations,
            _listed(index.missing_files),
        )
    if index.unannotated:
        logger.warning(
            "%s: %d image(s) have no (non-crowd) annotation; they are kept with an empty mask, which indexing "
            "skips: %s",
            name,
            len(index.unannotated),
            _listed(index.unannotated),
        )


def _instance_map(image: dict[str, Any], json_path: Path) -> tuple[np.ndarray, list[Any]]:
    """`(H, W)` uint16 instance map of an indexed image (annotation k -> id k + 1; where annotations overlap, the
    smaller one wins), and the ids of annotations left with no visible pixel."""
    height, width, anns = image["height"], image["width"], image["annotations"]
    if len(anns) >= np.iinfo(np.uint16).max:
        raise ValueError(
            f"{json_path}: image {image['id']!r} has {len(anns)} annotations; at most 65,534 fit a 16-bit "
            "instance map."
        )
    out = paint_masks([annotation_mask(a, height, width) for a in anns], (height, width)).astype(np.uint16)
    visible = np.bincount(out.ravel(), minlength=len(anns) + 1)[1:]
    hidden = [anns[k]["id"] for k in np.flatnonzero(visible == 0)]
    return out, hidden


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def load_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> datasets.Dataset:
    """Read COCO instance annotations as a `Dataset` with the columns of `sam_hf.data.sources.load_image_folder`.

    Args:
        path (`str` or `os.PathLike`): a COCO json file, or a directory holding `instances.json`.
        image_root (`str` or `os.PathLike`, *optional*): see `index_coco`.

    Returns:
        `datasets.Dataset` with `image` (the image file), `label` (a 16-bit PNG instance map: annotation `k` of the
        image in file order is id `k + 1`, 0 is background; where annotations overlap, the smaller one owns the
        pixels) and `file_name` (the `file_name` without its extension).

    Instance maps are made here, once, and held in memory as PNG bytes (a few kB per image). Annotations left with no
    visible pixel (empty polygons, or covered by smaller ones) are counted and logged. With `--mask_type auto`, an
    image with a single annotation is read as a binary mask, which splits a multi-polygon annotation into its
    connected components; `--mask_type instance` keeps every annotation one object.
    """
    index = index_coco(path, image_root)
    labels, hidden_all = [], []
    for image in index.images:
        instances, hidden = _instance_map(image, index.json_path)
        hidden_all += hidden
        labels.append({"bytes": _png_bytes(instances), "path": None})
    if hidden_all:
        logger.warning(
            "%s: %d annotation(s) have no visible pixel (empty, or covered by smaller annotations) and make no "
            "object: ids %s",
            index.json_path,
            len(hidden_all),
            _listed(hidden_all),
        )
    names = [str(PurePosixPath(image["file_name"]).with_suffix("")) for image in index.images]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Image(), "file_name": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [str(image["path"]) for image in index.images], "label": labels, "file_name": names},
        features=features,
    )
    used = sum(len(image["annotations"]) for image in index.images)
    logger.info(
        "Read %d images and %d of %d annotations from %s (images under %s)",
        len(ds),
        used,
        index.num_annotations,
        index.json_path,
        index.image_root,
    )
    return ds

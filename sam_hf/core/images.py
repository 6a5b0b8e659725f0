"""Images: the one safe way to open image files (decompression-bomb guard, EXIF orientation, errors naming the file),
listing folders, conversion to RGB arrays and the processors' input frame."""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from struct import error as StructError
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from transformers.image_utils import ChannelDimension

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class UnreadableImageError(ValueError):
    """Bytes or a file that Pillow cannot identify or decode: not an image, truncated or corrupt."""


class ImageTooLargeError(ValueError):
    """An image over Pillow's decompression-bomb limit, or over the `max_pixels` its reader was given."""


class AspectRatioError(ValueError):
    """An image too elongated for the model's input: resized, its short side would round to 0 px."""


class ImageHeader(NamedTuple):
    """What an image's header says, in its displayed orientation (EXIF applied).

    Attributes:
        width (`int`), height (`int`): the size a viewer shows.
        format (`str` or `None`): Pillow's format name (`"PNG"`, `"JPEG"`, ...); `None` for an image made in memory.
        mode (`str`): Pillow's mode (`"RGB"`, `"L"`, `"I;16"`, `"F"`, ...).
    """

    width: int
    height: int
    format: str | None
    mode: str


def list_images(path: str | os.PathLike, what: str | None = None) -> list[Path]:
    """The image files to read from `path`: the file itself, or a folder's image files (`IMAGE_EXTENSIONS`), sorted.

    Two files of a folder with one stem (`a.png` and `a.jpg`) are refused, not one dropped: images, masks and every
    output are paired or named by stem.

    Args:
        path (`str` or `os.PathLike`): an image file or a folder of images.
        what (`str`, *optional*): the argument errors name the path by, e.g. `"--images"`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a folder without image files, or with a stem shared by several files.
    """
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: no such file or folder.")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{name}: no image files ({', '.join(IMAGE_EXTENSIONS)}).")
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        listed = "; ".join(", ".join(p.name for p in paths) for paths in clashes)
        raise ValueError(
            f"{name} has {len(clashes)} file stem(s) shared by several image files ({listed}); images, masks and "
            "outputs are paired or named by stem, so each stem must name exactly one file. Remove or rename the "
            "extra files."
        )
    return files


def _capitalized(what: str) -> str:
    return what[:1].upper() + what[1:]


def _bomb_message(what: str, err: Any) -> str:
    return (
        f"{_capitalized(what)} is larger than Pillow's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS:,} pixels ({err}). If the image is intended, raise the limit before loading the "
        "data, e.g. `PIL.Image.MAX_IMAGE_PIXELS = 400_000_000` (or None to disable the check) in your launcher; "
        "otherwise remove or downscale the file."
    )


def _describe(source: Any) -> str:
    """How errors name `source` when the caller does not say."""
    if isinstance(source, dict):
        source = source.get("path") if source.get("bytes") is None else None
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)}"
    return "the image"


# `warnings.catch_warnings` changes process-wide state: one guarded read at a time keeps its save/restore pairs nested
# when several threads read images (the server's workers).
_WARNINGS_LOCK = threading.Lock()


_T = TypeVar("_T")


def _guarded(
    source: Any,
    what: str,
    read: Callable[[Image.Image], _T],
    formats: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> _T:
    """Open `source` (a path, bytes, or a `datasets.Image(decode=False)` value) with Pillow and return `read(image)`
    under the decompression-bomb guard. Every failure is an `UnreadableImageError` or an `ImageTooLargeError` that
    names `what`; an image between once and twice Pillow's limit is logged."""
    if isinstance(source, dict):
        source = io.BytesIO(source["bytes"]) if source.get("bytes") is not None else source.get("path")
        if source is None:
            raise UnreadableImageError(f"Cannot read {what}: it has neither bytes nor a path.")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    formats = tuple(formats) if formats is not None else None
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as image:  # reads the header, where Pillow checks the size
                pixels = image.width * image.height
                if max_pixels is not None and pixels > max_pixels:
                    raise ImageTooLargeError(
                        f"{_capitalized(what)} is {image.width}x{image.height} = {pixels:,} pixels, more than the "
                        f"{max_pixels:,} allowed."
                    )
                result = read(image)
    except (ImageTooLargeError, FileNotFoundError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(_bomb_message(what, err)) from err
    except UnidentifiedImageError as err:
        expected = f"one of {', '.join(formats)}" if formats else "a readable image file"
        # Pillow's message names the file (or a BytesIO object), which `what` already does.
        raise UnreadableImageError(
            f"Cannot read {what}: it is not an image in a format Pillow reads. Expected {expected}."
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError, StructError) as err:
        raise UnreadableImageError(
            f"Cannot read {what}: {err} (truncated or corrupt?). Expected a readable image file."
        ) from err
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            if max_pixels is None:  # with `max_pixels`, the caller's own limit decides
                logger.warning("%s", _bomb_message(what, w.message).replace("If the image", "Pillow accepts it, but"))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


#: EXIF orientations that swap width and height (transpose, rotations by 90 and 270 degrees, transverse).
_SWAPS_SIDES = (5, 6, 7, 8)


def _header_size(image: Image.Image) -> tuple[int, int]:
    """`(width, height)` as displayed, from the header alone."""
    # The base class's getexif reads the EXIF the header holds; PngImageFile.getexif would decode every pixel to look
    # for an eXIf chunk after the image data (writers put it before, as the PNG specification asks).
    orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    return image.size[::-1] if orientation in _SWAPS_SIDES else image.size


def _displayed(image: Image.Image) -> Image.Image:
    """`image` as every viewer and `datasets.Image` show it: its EXIF orientation applied with
    `PIL.ImageOps.exif_transpose`, which also removes the tag, so that a second pass changes nothing.

    The one place where sam_hf decides an image's orientation: opening files and converting PIL images both use it.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return image
    transposed = ImageOps.exif_transpose(image)
    transposed.format = image.format  # kept for the lossless-mask check: a JPEG mask stays a JPEG mask
    return transposed


def read_image_header(
    source: Any,
    what: str | None = None,
    *,
    formats: Sequence[str] | None = None,
    max_pixels: int | None = None,
    verify: bool = False,
) -> ImageHeader:
    """Size, format and mode of an image without decoding its pixels, in its displayed orientation: a photo whose
    EXIF says "rotate 90" reports the width and height that viewers, `datasets` and `open_image` give it.

    Args:
        source: an image file path, its bytes, a `datasets.Image(decode=False)` value (`{"bytes", "path"}`), or a
            PIL image.
        what (`str`, *optional*): how errors name the image (`"the image of row 3 of split 'train'"`); defaults to
            `"image file <path>"`.
        formats (`Sequence[str]`, *optional*): Pillow format names to accept (`("PNG", "JPEG")`); others are refused.
        max_pixels (`int`, *optional*): refuse images with more pixels (`ImageTooLargeError`).
        verify (`bool`, *optional*, defaults to `False`): also run Pillow's `verify()`, which finds many truncated or
            corrupt files without decoding them.

    Raises:
        UnreadableImageError: the file cannot be read as an image (a `ValueError` naming `what`).
        ImageTooLargeError: the image is above the pixel limit (a `ValueError` naming `what`).
    """
    if isinstance(source, Image.Image):
        return ImageHeader(*_header_size(source), source.format, source.mode)
    what = what or _describe(source)
    if verify:
        _guarded(source, what, lambda image: image.verify(), formats, max_pixels)
    return _guarded(source, what, lambda image: ImageHeader(*_header_size(image), image.format, image.mode), formats)


def open_image(
    source: Any, what: str | None = None, *, formats: Sequence[str] | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode an image safely, in its displayed orientation.

    The reader every entry point of sam_hf uses (the folder loader, indexing, `predict`, `autolabel`, the server):
    Pillow's decompression-bomb guard (an error naming the image above twice `PIL.Image.MAX_IMAGE_PIXELS`, a logged
    warning above once), the EXIF orientation applied as viewers and `datasets` apply it, and every failure a
    `ValueError` naming the image.

    Args:
        source: an image file path, its bytes, a `datasets.Image(decode=False)` value (`{"bytes", "path"}`), or a
            PIL image (only turned to its displayed orientation).
        what (`str`, *optional*): how errors name the image; defaults to `"image file <path>"`.
        formats (`Sequence[str]`, *optional*): Pillow format names to accept; others are refused.
        max_pixels (`int`, *optional*): refuse images with more pixels, from the header, before decoding.

    Returns:
        The loaded `PIL.Image.Image` (its file closed). Its `format` is the file's, also when it was transposed.

    Raises:
        UnreadableImageError: the file cannot be read as an image (a `ValueError` naming `what`).
        ImageTooLargeError: the image is above the pixel limit (a `ValueError` naming `what`).
    """
    if isinstance(source, Image.Image):
        return _displayed(source)

    def load(image: Image.Image) -> Image.Image:
        image.load()
        return _displayed(image)

    return _guarded(source, what or _describe(source), load, formats, max_pixels)


def read_rgb(
    source: Any, what: str | None = None, *, formats: Sequence[str] | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """`open_image`, then `to_rgb_array`: the `(H, W, 3)` uint8 pixels of an image file, every error naming it."""
    what = what or _describe(source)
    image = open_image(source, what, formats=formats, max_pixels=max_pixels)
    try:
        return to_rgb_array(image)
    except ValueError as err:
        raise ValueError(f"{_capitalized(what)}: {str(err)[:1].lower()}{str(err)[1:]}") from err


def to_rgb_array(image: Any) -> np.ndarray:
    """Convert a PIL image (in its displayed orientation) or an array (grayscale, RGBA, 16-bit, float) to an
    `(H, W, 3)` uint8 array. Float images are scaled from their minimum to their maximum; NaN or infinite pixels are
    refused with a `ValueError`, since they would make the whole image black."""
    if isinstance(image, Image.Image):
        image = _displayed(image)
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
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(
                f"The image has {int((~finite).sum()):,} NaN or infinite pixel value(s) out of {arr.size:,}; expected "
                "finite values. Replace them (e.g. with numpy.nan_to_num) before segmenting the image."
            )
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


def resized_shape(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The `(H, W)` that `SamImageProcessor` resizes an image to: longest side `longest_edge`, aspect kept."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def processor_longest_edge(processor: Any, labels: bool = False) -> int | None:
    """The side a processor resizes an image's longest side to, keeping its aspect ratio (`size["longest_edge"]` of
    SAM and SAM-HQ); `None` for processors that resize every image to a square (SAM 2 and its descendants).

    Args:
        processor: a processor or its image processor.
        labels (`bool`, *optional*, defaults to `False`): the smaller of that side and the one training labels are
            resized to (`mask_size["longest_edge"]`).
    """
    image_processor = getattr(processor, "image_processor", processor)
    sizes = [getattr(image_processor, "size", None)] + (
        [getattr(image_processor, "mask_size", None)] if labels else []
    )
    edges = [int(size.get("longest_edge")) for size in sizes if size is not None and size.get("longest_edge")]
    return min(edges) if edges else None


def check_aspect_ratio(height: int, width: int, longest_edge: int | None, what: str) -> None:
    """Refuse an image that the model's input cannot hold: resized so that its longest side is `longest_edge` (see
    `processor_longest_edge`), its short side must round to at least 1 px, so its long side may be at most
    `2 * longest_edge` times its short side. `longest_edge=None` (a square resize) takes any image.

    Raises:
        AspectRatioError: a `ValueError` naming `what`, its size and the largest aspect ratio the model takes.
    """
    if longest_edge is None or min(resized_shape(height, width, longest_edge)) >= 1:
        return
    ratio = max(height, width) / min(height, width)
    raise AspectRatioError(
        f"{_capitalized(what)} is {width}x{height} (WxH), an aspect ratio of {ratio:,.0f}:1; the model resizes its "
        f"longest side to {longest_edge} px, which rounds its short side to 0 px. The largest aspect ratio this model "
        f"takes is {2 * longest_edge}:1: crop the image into pieces or pad its short side."
    )


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

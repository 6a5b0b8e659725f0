"""The one image reader of sam_hf: listing, EXIF orientation, non-finite pixels, the model's largest aspect ratio."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sam_hf import tiny_sam_config, tiny_sam_processor
from sam_hf.core.images import (
    AspectRatioError,
    ImageTooLargeError,
    UnreadableImageError,
    check_aspect_ratio,
    encode_images,
    list_images,
    open_image,
    processor_longest_edge,
    read_image_header,
    read_rgb,
    to_rgb_array,
)

#: EXIF tag 0x0112, value 6: "rotate 90 degrees clockwise to display" (what phones write for a portrait photo).
ROTATE_90 = 6


def _rotated_photo(path, fmt: str) -> np.ndarray:
    """Write a 200 x 120 (WxH) image tagged "rotate 90" to `path`; returns its pixels as displayed (120 x 200),
    rotated here with numpy, not with Pillow's `exif_transpose`."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 255, (120, 200, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90
    Image.fromarray(stored).save(path, format=fmt, exif=exif.tobytes())
    with Image.open(path) as im:  # the stored pixels as decoded (JPEG is lossy)
        decoded = np.asarray(im.convert("RGB"))
    return np.rot90(decoded, k=-1)  # clockwise


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_by_every_reader(tmp_path, fmt):
    path = tmp_path / f"photo.{fmt.lower()}"
    displayed = _rotated_photo(path, fmt)
    assert displayed.shape == (200, 120, 3)
    header = read_image_header(path)
    assert (header.width, header.height, header.format) == (120, 200, fmt)
    assert read_image_header(path.read_bytes()).width == 120  # from bytes, as the server reads them
    assert read_image_header({"bytes": None, "path": str(path)}).height == 200  # a datasets.Image(decode=False) value
    opened = open_image(path)
    assert opened.size == (120, 200) and opened.format == fmt
    np.testing.assert_array_equal(np.asarray(opened.convert("RGB")), displayed)
    np.testing.assert_array_equal(read_rgb(path), displayed)
    with Image.open(path) as raw:  # a PIL image opened by the caller is converted as displayed too
        np.testing.assert_array_equal(to_rgb_array(raw), displayed)
    # Applied once: converting the image read as displayed changes nothing.
    np.testing.assert_array_equal(to_rgb_array(opened), displayed)
    assert read_image_header(opened).width == 120


def test_list_images_is_one_lister(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image extension is not an image
    assert list_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.png"]
    assert list_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]  # a file given by name is read as it is
    with pytest.raises(FileNotFoundError, match=r"--images .*nope: no such file or folder"):
        list_images(tmp_path / "nope", "--images")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no image files \(\.png"):
        list_images(tmp_path / "empty")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"1 file stem\(s\) shared by several image files \(a\.jpg, a\.png\)"):
        list_images(tmp_path, "--images")


def test_unreadable_and_oversized_images_name_the_image(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"not an image")
    with pytest.raises(UnreadableImageError, match=r"Cannot read image file .*a\.png: it is not an image"):
        open_image(tmp_path / "a.png")
    with pytest.raises(UnreadableImageError, match="Cannot read the upload: .*Expected one of PNG"):
        read_image_header(b"not an image", "the upload", formats=["PNG"])
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(buffer, format="PNG")
    with pytest.raises(ImageTooLargeError, match=r"The upload is 10x10 = 100 pixels, more than the 99 allowed"):
        read_rgb(buffer.getvalue(), "the upload", max_pixels=99)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 100 pixels > 2 x 40: Pillow refuses
    with pytest.raises(ImageTooLargeError, match="The upload is larger than Pillow's decompression-bomb limit"):
        read_image_header(buffer.getvalue(), "the upload")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(tmp_path, bad):
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[2, 3] = bad
    with pytest.raises(ValueError, match=r"The image has 1 NaN or infinite pixel value\(s\) out of 64"):
        to_rgb_array(pixels)
    Image.fromarray(pixels, mode="F").save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"Image file .*float\.tif: the image has 1 NaN or infinite pixel"):
        read_rgb(tmp_path / "float.tif")
    # Finite float pixels still span 0..255.
    pixels[2, 3] = 0.5
    Image.fromarray(pixels, mode="F").save(tmp_path / "float.tif")
    rgb = read_rgb(tmp_path / "float.tif")
    assert (rgb.min(), rgb.max()) == (0, 255)


def test_the_largest_aspect_ratio_is_where_the_processor_fails():
    """SamImageProcessor resizes the longest side to 256 px here and rounds the short side: 1 x 512 becomes 1 x 256
    (0.5 px rounds up), 1 x 513 would be 0 x 256. The check refuses exactly what the processor cannot take."""
    processor = tiny_sam_processor(tiny_sam_config())  # 256-px input, 64-px labels
    assert processor_longest_edge(processor) == 256
    assert processor_longest_edge(processor.image_processor, labels=True) == 64
    for height, width in [(1, 512), (512, 1), (3, 1536), (2, 1023)]:
        check_aspect_ratio(height, width, 256, "x")
        encode_images(processor.image_processor, np.zeros((height, width, 3), np.uint8))
    for height, width in [(1, 513), (513, 1), (2, 1025), (1, 40_000_000)]:
        with pytest.raises(AspectRatioError, match=rf"The image x is {width}x{height} \(WxH\).*takes is 512:1"):
            check_aspect_ratio(height, width, 256, "the image x")
        if height * width < 10_000:
            with pytest.raises(ValueError, match="width=0|height=0"):
                encode_images(processor.image_processor, np.zeros((height, width, 3), np.uint8))
    check_aspect_ratio(1, 40_000_000, None, "x")  # a processor that resizes to the square takes any shape


def test_square_resizing_processors_have_no_aspect_limit():
    from sam_hf.family.registry import tiny_config, tiny_processor

    processor = tiny_processor(tiny_config("sam2"))  # SAM 2 resizes every image to the square input
    assert processor_longest_edge(processor) is None and processor_longest_edge(processor, labels=True) is None

"""Images that used to break the entry points: a photo tagged with an EXIF rotation, images too elongated for the
model's input, and float images with NaN or infinite pixels. Every entry point reads them the same way."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_BASE
from PIL import Image

from sam_hf import SamPredictor, SamTransform
from sam_hf.apps.autolabel import AutolabelArguments, run_autolabel
from sam_hf.apps.predict import PredictArguments, run_prediction
from sam_hf.config.arguments import DataArguments
from sam_hf.config.parser import parse_args
from sam_hf.data.indexing import index_objects
from sam_hf.data.sources import load_source
from sam_hf.evaluation.arguments import EvaluateArguments
from sam_hf.evaluation.run import run_evaluation
from sam_hf.family.modeling import load_model_and_processor
from sam_hf.training.run import run_training

#: The object's box as the photo is displayed (xyxy, inclusive): below y = 120, so outside the stored 200 x 120 frame.
BOX = [15, 130, 94, 184]


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rotated_photo(tmp_path_factory) -> SimpleNamespace:
    """A portrait photo as a phone stores it: 200 x 120 (WxH) JPEG pixels tagged "rotate 90 clockwise" (EXIF
    orientation 6), shown 120 x 200, with its mask drawn as shown. Beside it, its twin: the pixels as shown (the
    decoded JPEG rotated with numpy), saved as a plain PNG without EXIF, with the same mask."""
    root = tmp_path_factory.mktemp("rotated")
    rng = np.random.default_rng(0)
    shown = rng.integers(0, 50, (200, 120, 3), np.uint8)
    mask = np.zeros((200, 120), np.uint8)
    mask[BOX[1] : BOX[3] + 1, BOX[0] : BOX[2] + 1] = 1
    shown[mask > 0] += 180
    exif = Image.Exif()
    exif[0x0112] = 6
    photo, twin = root / "photo" / "images" / "photo.jpg", root / "twin" / "images" / "photo.png"
    for folder in (photo.parent.parent, twin.parent.parent):
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        Image.fromarray(mask).save(folder / "masks" / "photo.png")
    Image.fromarray(np.rot90(shown, k=1)).save(photo, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(photo) as stored:
        assert stored.size == (200, 120)
        pixels = np.rot90(np.asarray(stored.convert("RGB")), k=-1)  # rotated clockwise: as a viewer shows it
    Image.fromarray(pixels).save(twin)
    return SimpleNamespace(photo=photo, twin=twin, pixels=np.ascontiguousarray(pixels), mask=mask > 0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _training_rows(folder: Path, processor):
    rows = index_objects(load_source(str(folder))["train"])
    return rows, SamTransform(processor, train=False)(rows[:1])


@pytest.mark.slow
def test_a_rotated_photo_is_read_as_displayed_by_every_entry_point(rotated_photo, tmp_path, caplog):
    """Training, evaluation, predict, autolabel and the server all see the photo as it is shown: each gives what it
    gives on the twin PNG of the shown pixels, and the box drawn around the object as shown finds the object."""
    pytest.importorskip("fastapi")  # the server's extra (and httpx, for its TestClient)
    pytest.importorskip("httpx")
    photo_dir, twin_dir = rotated_photo.photo.parent.parent, rotated_photo.twin.parent.parent
    expected = SamPredictor.from_pretrained(str(TINY_BASE))(rotated_photo.pixels, boxes=[BOX]).masks[0, 0]
    assert _dice(expected, rotated_photo.mask) > 0.5  # the pretrained tiny base finds the object from its box

    # Training: the folder check passes, the object is indexed where it is shown, the model inputs and labels equal
    # the twin's, and a tiny run trains on it.
    _, processor = load_model_and_processor(str(TINY_BASE))
    (photo_rows, photo_inputs), (_, twin_inputs) = (_training_rows(d, processor) for d in (photo_dir, twin_dir))
    assert photo_rows["boxes"] == [[[float(v) for v in BOX]]]
    for key in ("pixel_values", "labels", "input_boxes", "original_sizes"):
        np.testing.assert_array_equal(np.asarray(photo_inputs[key][0]), np.asarray(twin_inputs[key][0]), key)
    argv = ["--model_name_or_path", str(TINY_BASE), "--dataset_name", str(photo_dir), "--output_dir",
            str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "1", "--report_to", "none",
            "--validation_split_percentage", "0", "--save_strategy", "no"]  # fmt: skip
    assert run_training(*parse_args(argv))["train_samples"] == 1

    # Evaluation: the Dice of the object's box prompt is the library's on the shown pixels.
    for name, folder in (("photo", photo_dir), ("twin", twin_dir)):
        run_evaluation(
            EvaluateArguments(model=[f"base={TINY_BASE}"], output_dir=str(tmp_path / f"eval-{name}"), split="train",
                              device="cpu", num_figure_images=0),
            DataArguments(dataset_name=str(folder), validation_split_percentage=0),
        )  # fmt: skip
    (photo_object,), (twin_object,) = (
        [json.loads(line) for line in (tmp_path / f"eval-{name}" / "per_object.jsonl").read_text().splitlines()]
        for name in ("photo", "twin")
    )
    assert photo_object["dice"] == twin_object["dice"]
    assert photo_object["dice"]["base"] == pytest.approx(_dice(expected, rotated_photo.mask), abs=1e-6)

    # Predict: the box as shown is inside the image, and the masks are the twin's.
    box = ",".join(str(v) for v in BOX)
    for name, image in (("photo", rotated_photo.photo), ("twin", rotated_photo.twin)):
        report = run_prediction(
            PredictArguments(
                model=str(TINY_BASE), images=str(image), boxes=box, output_dir=str(tmp_path / name), device="cpu"
            )  # fmt: skip
        )[image.name]
        assert report["size"] == [200, 120]
        written = np.asarray(Image.open(tmp_path / name / "photo" / "mask_000.png")) > 0
        np.testing.assert_array_equal(written, expected)

    # Autolabel: labels drawn on the photo as shown, the same as the twin's, and read back by training.
    labels = {}
    for name, images in (("photo", rotated_photo.photo.parent), ("twin", rotated_photo.twin.parent)):
        out = tmp_path / f"labels-{name}"
        run_autolabel(
            AutolabelArguments(
                model=str(TINY_BASE),
                images=str(images),
                output_dir=str(out),
                points_per_side=4,
                pred_iou_thresh=0.0,
                stability_score_thresh=0.0,
                device="cpu",
            )  # fmt: skip
        )
        labels[name] = np.asarray(Image.open(out / "instances" / "photo.png"))
        assert len(index_objects(load_source(str(out))["train"], "instance")) == 1
    assert labels["photo"].shape == (200, 120) and labels["photo"].any()
    np.testing.assert_array_equal(labels["photo"], labels["twin"])

    # The server: the photo's size as shown, and the library's mask for the box as shown.
    from fastapi.testclient import TestClient

    from sam_hf.apps.serve.app import create_app
    from sam_hf.apps.serve.requests import decode_rle
    from sam_hf.apps.serve.settings import ServeSettings

    with TestClient(create_app(TINY_BASE, settings=ServeSettings(device="cpu"))) as client:
        response = client.post(
            "/segment",
            files={"image": ("photo.jpg", rotated_photo.photo.read_bytes(), "image/jpeg")},
            data={"prompts": json.dumps({"boxes": [BOX]})},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (120, 200)
    np.testing.assert_array_equal(decode_rle(body["masks"][0][0]), expected)


@pytest.mark.slow
def test_training_skips_an_image_too_elongated_for_the_model(tmp_path, caplog):
    """The tiny base resizes labels to 128 px on the longest side: a 1 x 600 strip (600:1, over 256:1) would get a
    0-px label; `scripts/train.py` skips it, counts it and names it, and trains on the rest."""
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 50, (64, 64, 3), np.uint8)
    image[10:30, 20:50] += 150
    Image.fromarray(image).save(root / "images" / "cells.png")
    Image.fromarray(np.pad(np.ones((20, 30), np.uint8), ((10, 34), (20, 14)))).save(root / "masks" / "cells.png")
    Image.fromarray(np.full((1, 600, 3), 90, np.uint8)).save(root / "images" / "strip.png")
    Image.fromarray(np.ones((1, 600), np.uint8)).save(root / "masks" / "strip.png")
    argv = ["--model_name_or_path", str(TINY_BASE), "--dataset_name", str(root), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1", "--per_device_train_batch_size", "1", "--report_to", "none",
            "--validation_split_percentage", "0", "--save_strategy", "no"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        metrics = run_training(*parse_args(argv))
    assert metrics["train_samples"] == 1
    assert "strip.png) is 600x1 (WxH)" in caplog.text
    assert "The largest aspect ratio this model takes is 256:1" in caplog.text
    assert "Split 'train': skipped 1 of 2 images too elongated for the model's input" in caplog.text


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sam_hf.apps.serve.app import create_app
    from sam_hf.apps.serve.settings import ServeSettings

    # The default max_image_pixels (40,000,000), which a 1 x 40,000,000 image does not exceed.
    with TestClient(create_app(tiny_model_dir, settings=ServeSettings(device="cpu"))) as test_client:
        yield test_client


def _segment(client, image: bytes, boxes: list) -> tuple[int, str]:
    response = client.post(
        "/segment",
        files={"image": ("image", image, "application/octet-stream")},
        data={"prompts": json.dumps({"boxes": boxes})},
    )
    return response.status_code, response.json().get("detail", "")


def test_the_server_refuses_an_image_too_elongated_for_the_model_with_a_4xx(client):
    """The tiny model resizes the longest side to 256 px: images over 512:1 cannot be encoded. They are refused from
    the header, before the pixels are decoded."""
    buffer = io.BytesIO()
    Image.new("L", (40_000_000, 1)).save(buffer, format="PNG")  # 40 MB of pixels in a few dozen KB
    status, detail = _segment(client, buffer.getvalue(), [[0, 0, 10, 1]])
    assert status == 422, detail
    assert "is 40000000x1 (WxH)" in detail and "The largest aspect ratio this model takes is 512:1" in detail
    status, detail = _segment(client, _png_bytes(np.zeros((20000, 10), np.uint8)), [[0, 0, 5, 100]])
    assert status == 422 and "an aspect ratio of 2,000:1" in detail, detail
    status, detail = _segment(client, _png_bytes(np.zeros((5120, 10), np.uint8)), [[0, 0, 5, 100]])
    assert status == 200, detail  # 512:1 is the limit itself


def test_the_server_refuses_non_finite_pixels_with_a_4xx(client):
    pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    pixels[40, 2] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    status, detail = _segment(client, buffer.getvalue(), [[1, 1, 30, 30]])
    assert status == 422 and "the image has 1 NaN or infinite pixel value(s)" in detail, detail
    pixels[40, 2] = 0.5
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    assert _segment(client, buffer.getvalue(), [[1, 1, 30, 30]])[0] == 200

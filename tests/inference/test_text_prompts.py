"""Text prompts: heat map -> boxes against hand-worked values, then CLIPSeg (a tiny one built here, with a tiny
CLIP tokenizer) -> boxes -> SAM through the library, scripts/predict.py and the server."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_BASE
from PIL import Image

from sam_hf.inference.predictor import SamPredictor
from sam_hf.inference.text_prompts import TextPrompter, heatmap_to_boxes


def two_blobs() -> np.ndarray:
    heat = np.zeros((12, 16))
    heat[2:5, 3:7] = 0.8  # blob A: rows 2-4, columns 3-6, 12 px
    heat[7:11, 10:12] = 0.6  # blob B: rows 7-10, columns 10-11, 8 px
    heat[8, 12] = 0.9  # joins B through an edge neighbour: B's peak is 0.9, its right edge column 12
    heat[0, 15] = 0.5  # a single pixel, its own blob
    heat[6, 9] = 0.39  # just under the threshold: never part of B
    return heat


def test_two_blobs_give_their_exact_boxes():
    boxes, peaks = heatmap_to_boxes(two_blobs(), threshold=0.4)
    # raster order of the first pixel: (0, 15), then A at (2, 3), then B at (7, 10)
    assert boxes.tolist() == [[15, 0, 15, 0], [3, 2, 6, 4], [10, 7, 12, 10]]
    assert peaks.tolist() == pytest.approx([0.5, 0.8, 0.9])
    boxes, _ = heatmap_to_boxes(two_blobs(), threshold=0.4, min_area=2)  # the single pixel goes
    assert boxes.tolist() == [[3, 2, 6, 4], [10, 7, 12, 10]]
    boxes, _ = heatmap_to_boxes(two_blobs(), threshold=0.7)  # B without its 0.6 pixels is the one 0.9 pixel
    assert boxes.tolist() == [[3, 2, 6, 4], [12, 8, 12, 8]]
    boxes, _ = heatmap_to_boxes(two_blobs(), threshold=0.39)  # now (6, 9) joins B diagonally (8-connected)
    assert boxes.tolist()[-1] == [9, 6, 12, 10]
    boxes, peaks = heatmap_to_boxes(two_blobs(), threshold=0.4, max_boxes=2)  # the two highest peaks, in order
    assert boxes.tolist() == [[3, 2, 6, 4], [10, 7, 12, 10]] and peaks.tolist() == pytest.approx([0.8, 0.9])
    assert heatmap_to_boxes(two_blobs(), threshold=0.95)[0].shape == (0, 4)


def test_boxes_scale_to_the_image():
    # A 12x16 map stretched over a 24x40 image: x scale 2.5, y scale 2. Blob A's columns 3..6 cover image
    # x from floor(3 * 2.5) = 7 to ceil(7 * 2.5) - 1 = 17; rows 2..4 cover y from 4 to 5 * 2 - 1 = 9.
    boxes, _ = heatmap_to_boxes(two_blobs(), threshold=0.4, min_area=2, image_size=(24, 40))
    assert boxes.tolist() == [[7, 4, 17, 9], [25, 14, 32, 21]]  # B: x 10..12 -> 25..ceil(32.5)-1; y 7..10 -> 14..21
    # a blob touching the last column ends at the image's last pixel
    heat = np.zeros((4, 4))
    heat[:, 3] = 1
    assert heatmap_to_boxes(heat, image_size=(9, 9))[0].tolist() == [[6, 0, 8, 8]]


@pytest.mark.parametrize(
    "heat, kwargs, message",
    [
        (np.zeros(5), {}, r"Expected an \(h, w\) heat map"),
        (np.full((2, 2), np.nan), {}, "NaN"),
        (np.zeros((2, 2)), {"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
        (np.zeros((2, 2)), {"min_area": 0}, "min_area must be >= 1"),
    ],
)
def test_bad_heatmaps(heat, kwargs, message):
    with pytest.raises(ValueError, match=message):
        heatmap_to_boxes(heat, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# A tiny CLIPSeg, saved like a Hub checkpoint
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clipseg_dir(tmp_path_factory) -> Path:
    """A randomly initialised CLIPSeg (64-px input, 4x4 patches) with a CLIP tokenizer of single letters."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    text.update(num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision.update(image_size=64, patch_size=16)
    config = CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=16,
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clipseg")
    CLIPSegForImageSegmentation(config).save_pretrained(path)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sam() -> SamPredictor:
    return SamPredictor.from_pretrained(str(TINY_BASE))


@pytest.fixture(scope="module")
def nucleus_image(nuclei_dir) -> Image.Image:
    path = sorted((nuclei_dir / "images").glob("*.png"))[1]  # 383x512 (HxW): not square
    return Image.open(path).convert("RGB")


def test_heatmap_of_the_tiny_clipseg(tiny_clipseg_dir, nucleus_image):
    prompter = TextPrompter.from_pretrained(str(tiny_clipseg_dir))
    heat = prompter.heatmap(nucleus_image, "  nucleus ")
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert 0.0 < heat.min() <= heat.max() < 1.0
    assert np.allclose(heat, prompter.heatmap(np.asarray(nucleus_image), "nucleus"))  # same text once stripped
    with pytest.raises(ValueError, match="non-empty string"):
        prompter.heatmap(nucleus_image, "  ")
    with pytest.raises(ValueError, match="could not load a CLIPSeg model"):
        TextPrompter.from_pretrained(str(REPO / "models" / "no-such-model"))


def test_segment_refines_each_blob_box_with_sam(tiny_clipseg_dir, sam, nucleus_image, monkeypatch):
    prompter = TextPrompter.from_pretrained(str(tiny_clipseg_dir), min_area=1)
    # CLIPSeg's map is stretched over the image: two blobs of a 12x16 map on this 383x512 image.
    monkeypatch.setattr(prompter, "heatmap", lambda image, text: two_blobs().astype(np.float32))
    sam.set_image(nucleus_image)
    found = prompter.segment(sam, nucleus_image, "nucleus")
    expected, _ = heatmap_to_boxes(two_blobs(), 0.4, 1, (383, 512))
    assert np.array_equal(found.boxes, expected) and len(found.boxes) == 3
    # blob A, columns 3..6 and rows 2..4 of the map: x from floor(3 * 32) = 96 to 7 * 32 - 1 = 223,
    # y from floor(2 * 383 / 12) = 63 to ceil(5 * 383 / 12) - 1 = 159
    assert found.boxes[1].tolist() == [96, 63, 223, 159]
    direct = sam.predict(boxes=expected)
    assert np.array_equal(found.prediction.masks, direct.masks)
    assert found.prediction.masks.shape == (3, 1, 383, 512)


def test_no_blob_gives_no_mask_and_a_warning(tiny_clipseg_dir, sam, nucleus_image, caplog):
    prompter = TextPrompter.from_pretrained(str(tiny_clipseg_dir), threshold=1.0)  # a sigmoid never reaches 1
    sam.set_image(nucleus_image)
    with caplog.at_level(logging.WARNING, logger="sam_hf"):
        found = prompter.segment(sam, nucleus_image, "nucleus", multimask_output=True)
    assert found.boxes.shape == (0, 4) and found.prediction.masks.shape == (0, 3, 383, 512)
    assert found.prediction.best()[0].shape == (0, 383, 512)
    assert "no heat-map pixel reaches the threshold 1.00" in caplog.text


def test_predict_script_with_text(tiny_clipseg_dir, nuclei_dir, tmp_path):
    from transformers import HfArgumentParser

    from sam_hf.apps.predict import PredictArguments, run_prediction

    image = sorted((nuclei_dir / "images").glob("*.png"))[0]
    argv = ["--model", str(TINY_BASE), "--images", str(image), "--output_dir", str(tmp_path), "--text", "nucleus"]
    argv += ["--text_model", str(tiny_clipseg_dir), "--text_threshold", "0"]
    (args,) = HfArgumentParser(PredictArguments).parse_args_into_dataclasses(args=argv)
    report = run_prediction(args)
    entry = report[image.name]
    # threshold 0: every heat-map pixel is in the one blob, whose box is the whole 256x256 image
    assert entry["prompts"]["text"] == "nucleus" and entry["prompts"]["boxes"] == [[0, 0, 255, 255]]
    heat = Image.open(tmp_path / f"{image.stem}_heatmap.png")
    assert heat.size == (256, 256) and heat.mode == "L"
    assert (tmp_path / f"{image.stem}_overlay.png").is_file() and len(entry["best_score"]) == 1
    with pytest.raises(ValueError, match="either --text or box/point prompts"):
        PredictArguments(model="m", images="i", text="nucleus", boxes="1,2,3,4")


def test_server_text_field(tiny_clipseg_dir, nuclei_dir, sam):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from sam_hf.apps.serve.app import create_app
    from sam_hf.apps.serve.requests import decode_rle
    from sam_hf.apps.serve.settings import ServeSettings

    image = sorted((nuclei_dir / "images").glob("*.png"))[0].read_bytes()
    files = {"image": ("cells.png", image, "image/png")}
    settings = ServeSettings(text_model=str(tiny_clipseg_dir), max_prompts=8, device="cpu")  # compared with CPU models
    with TestClient(create_app(TINY_BASE, settings=settings)) as client:
        body = client.post("/segment", files=files, data={"text": "nucleus"}).json()
        assert set(body) >= {"boxes", "text_peaks", "masks", "scores", "text"}
        prompter = TextPrompter.from_pretrained(str(tiny_clipseg_dir), max_boxes=8)
        rgb = Image.open(io.BytesIO(image)).convert("RGB")
        _, boxes, _ = prompter.boxes(rgb, "nucleus")
        assert body["boxes"] == boxes.tolist() and len(boxes) >= 1  # the seeded tiny model lights up the image
        sam.set_image(rgb)
        expected = sam.predict(boxes=boxes).masks
        got = np.stack([np.stack([decode_rle(m) for m in per_box]) for per_box in body["masks"]])
        assert np.array_equal(got, expected)
        # `prompts` may come with `text`, for multimask_output
        body = client.post(
            "/segment", files=files, data={"text": "nucleus", "prompts": json.dumps({"multimask_output": True})}
        ).json()
        assert np.asarray(body["scores"]).shape == (len(boxes), 3)
        bad = client.post("/segment", files=files, data={"text": "nucleus", "prompts": '{"boxes": [[1, 2, 3, 4]]}'})
        assert bad.status_code == 422 and "either `text` or box/point" in bad.json()["detail"]
        empty = client.post("/segment", files=files, data={"text": "   "})
        assert empty.status_code == 422 and "non-empty string" in empty.json()["detail"]
    offline = ServeSettings(text_model=str(REPO / "models" / "no-such-clipseg"))
    with TestClient(create_app(TINY_BASE, settings=offline)) as client:
        response = client.post("/segment", files=files, data={"text": "nucleus"})
        assert response.status_code == 503 and "Text prompts are unavailable" in response.json()["detail"]
        ok = client.post("/segment", files=files, data={"prompts": '{"boxes": [[10, 10, 60, 60]]}'})
        assert ok.status_code == 200  # box prompts keep working

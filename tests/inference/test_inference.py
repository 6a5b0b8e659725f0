from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamModel, SamProcessor

from sam_hf import PromptError, SamPredictor, label_image
from sam_hf.core.prompts import validate_prompts


@pytest.fixture(scope="module")
def predictor_and_image(tiny_model_dir, nuclei_dir):
    predictor = SamPredictor.from_pretrained(str(tiny_model_dir))
    image = Image.open(sorted((nuclei_dir / "images").iterdir())[0]).convert("RGB")
    image = image.crop((0, 0, 256, 180))  # non-square: exercises the resize-and-pad path
    return predictor, image


def test_prompts_match_processor_and_full_forward(predictor_and_image, tiny_model_dir):
    """The shared-encoding path gives the masks of the plain processor + full forward + post-processing path."""
    predictor, image = predictor_and_image
    model = SamModel.from_pretrained(tiny_model_dir).eval()
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    boxes = [[10.0, 12.0, 60.0, 70.0], [100.0, 40.0, 180.0, 170.0], [0.0, 0.0, 256.0, 180.0]]
    points = [[[30.0, 40.0], [5.0, 5.0]], [[140.0, 100.0], [120.0, 60.0]], [[200.0, 20.0], [10.0, 150.0]]]
    labels = [[1, 0], [1, 1], [1, 0]]
    predictor.set_image(image)
    for prompts, proc_kwargs in [
        ({"boxes": boxes}, {"input_boxes": [boxes]}),
        ({"points": points, "point_labels": labels}, {"input_points": [points], "input_labels": [labels]}),
        (
            {"boxes": boxes, "points": points, "point_labels": labels},
            {"input_boxes": [boxes], "input_points": [points], "input_labels": [labels]},
        ),
    ]:
        for multimask in (False, True):
            got = predictor.predict(**prompts, multimask_output=multimask)
            inputs = processor(images=image, return_tensors="pt", **proc_kwargs)
            with torch.no_grad():
                out = model(
                    **{k: v for k, v in inputs.items() if k.startswith(("pixel", "input"))}, multimask_output=multimask
                )
            expected = processor.post_process_masks(
                out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )[0].numpy()
            m = 3 if multimask else 1
            assert got.masks.shape == (3, m, 180, 256) and got.scores.shape == (3, m)
            torch.testing.assert_close(torch.from_numpy(got.logits), out.pred_masks[0], atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(got.scores, out.iou_scores[0].numpy(), atol=1e-5)
            # Identical except possibly at pixels whose logit is within float noise of the threshold.
            assert (got.masks != expected).mean() < 1e-4


def test_chunking_does_not_change_results(predictor_and_image, tiny_model_dir):
    predictor, image = predictor_and_image
    boxes = np.array([[x, y, x + 30, y + 25] for x in range(0, 200, 40) for y in range(0, 150, 50)], float)
    predictor.set_image(image)
    whole = predictor.predict(boxes=boxes)
    chunked = SamPredictor.from_pretrained(str(tiny_model_dir), chunk_size=4)(image, boxes=boxes)
    assert whole.masks.shape[0] == len(boxes) == 15
    np.testing.assert_array_equal(whole.masks, chunked.masks)
    np.testing.assert_allclose(whole.scores, chunked.scores, atol=1e-6)


def test_best_picks_highest_score():
    from sam_hf import SamPrediction

    masks = np.zeros((2, 3, 4, 4), bool)
    masks[0, 2, 0, 0] = masks[1, 0, 1, 1] = True
    pred = SamPrediction(masks, np.array([[0.1, 0.2, 0.9], [0.8, 0.3, 0.1]], np.float32), np.zeros((2, 3, 2, 2)))
    best_masks, best_scores = pred.best()
    assert best_masks[0, 0, 0] and best_masks[1, 1, 1] and best_masks.sum() == 2
    np.testing.assert_allclose(best_scores, [0.9, 0.8])


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ({"boxes": [[10, 10, 5, 40]]}, "Box 0 is inverted"),
        ({"boxes": [[1, 2, 3, 4], [np.nan, 1, 2, 3]]}, "Box 1 has a NaN"),
        ({"boxes": [[0, 0, 300, 30]]}, "outside the 256x180 image"),
        ({"boxes": [[-1, 0, 3, 30]]}, "outside"),
        ({"boxes": [[1, 2, 3]]}, "last dimension of 4"),
        ({"points": [[10, 10], [10, 200]]}, "outside the 256x180 image"),
        ({"points": [[10, np.inf]]}, "NaN or infinite"),
        ({"points": [[10, 10]], "point_labels": [2]}, "1 (positive) or 0 (negative)"),
        ({"points": [[[1, 1]], [[2, 2]]], "boxes": [[0, 0, 5, 5]]}, "2 point sets"),
        ({}, "at least one prompt"),
        ({"boxes": "abc"}, "numeric"),
        ({"boxes": [[1, 2, 3, 10**400]]}, "too large"),
        ({"boxes": []}, "`boxes` is empty"),
        ({"boxes": [[0, 0, 5, 5]], "point_labels": [[1]]}, "without `points`"),
    ],
)
def test_bad_prompts_are_rejected_clearly(prompts, message):
    with pytest.raises(PromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_prompts((180, 256), **prompts)


def test_predict_needs_an_image(tiny_model_dir):
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor.from_pretrained(str(tiny_model_dir)).predict(boxes=[0, 0, 5, 5])


def test_label_image_smaller_object_wins():
    masks = np.zeros((2, 5, 5), bool)
    masks[0] = True  # large
    masks[1, 1:3, 1:3] = True  # small, inside
    expected = np.ones((5, 5), np.uint16)
    expected[1:3, 1:3] = 2
    np.testing.assert_array_equal(label_image(masks), expected)


@pytest.mark.parametrize("shape", [(4, 64), (64, 4), (1, 1), (2, 3), (3, 40), (1, 7)])
def test_tiny_images_keep_their_own_size(tiny_model_dir, shape):
    """Images 1 to 4 pixels high are (H, W, 3), never read channels-first by the image processor."""
    height, width = shape
    rng = np.random.default_rng(height * 100 + width)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    predictor = SamPredictor.from_pretrained(str(tiny_model_dir))
    predictor.set_image(image)
    assert predictor.original_size == (height, width)
    # The processor's longest side is 256: the reshaped size keeps the image's own aspect ratio.
    scale = 256 / max(height, width)
    assert predictor.reshaped_size == (int(height * scale + 0.5), int(width * scale + 0.5))
    result = predictor.predict(boxes=[[0, 0, width, height]], points=[[[width / 2, height / 2]]])
    assert result.masks.shape == (1, 1, height, width)
    if height != width:  # a box fitting the transposed image lies outside this one
        with pytest.raises(PromptError, match=f"outside the {width}x{height} image"):
            predictor.predict(boxes=[[0, 0, height, width]])
    # The same pixels as a PIL image give the same encoding (and grayscale is converted the same way).
    predictor_pil = SamPredictor.from_pretrained(str(tiny_model_dir))
    predictor_pil.set_image(Image.fromarray(image))
    torch.testing.assert_close(predictor_pil.image_embeddings, predictor.image_embeddings)


def test_correction_click_with_the_previous_mask(predictor_and_image, tiny_model_dir):
    """A box, then a negative click with the previous low-res logits fed back: equal to SAM's full forward with
    `input_masks`, and different from the same click without the mask."""
    predictor, image = predictor_and_image
    model = SamModel.from_pretrained(tiny_model_dir).eval()
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    box, click, label = [100.0, 40.0, 180.0, 170.0], [[150.0, 60.0]], [0]
    predictor.set_image(image)
    first = predictor.predict(boxes=[box])
    previous = first.logits[0, 0]
    fixed = predictor.predict(boxes=[box], points=[click], point_labels=[label], mask_input=previous)
    plain = predictor.predict(boxes=[box], points=[click], point_labels=[label])
    assert fixed.masks.shape == (1, 1, 180, 256)
    assert not np.allclose(fixed.logits, plain.logits), "the previous mask must reach the prompt encoder"
    inputs = processor(
        images=image, input_boxes=[[box]], input_points=[[click]], input_labels=[[label]], return_tensors="pt"
    )
    with torch.no_grad():
        out = model(
            **{k: v for k, v in inputs.items() if k.startswith(("pixel", "input"))},
            input_masks=torch.from_numpy(previous)[None, None],
            multimask_output=False,
        )
    torch.testing.assert_close(torch.from_numpy(fixed.logits), out.pred_masks[0], atol=1e-4, rtol=1e-4)

    side = previous.shape[-1]
    with pytest.raises(PromptError, match=f"mask_input must be the {side}x{side} low-resolution logits"):
        predictor.predict(boxes=[box], mask_input=np.zeros((side, side + 1)))
    with pytest.raises(PromptError, match="NaN or infinite"):
        predictor.predict(boxes=[box], mask_input=np.full((side, side), np.nan))
    with pytest.raises(PromptError, match="give it with one prompt, got 2"):
        predictor.predict(boxes=[box, box], mask_input=previous)


def test_mask_input_from_a_binary_mask(tiny_model_dir):
    """A 90 x 150 image in the tiny model's 64-px mask frame: 38 x 64 of image, padding below. The left half of the
    image (columns < 75) covers exactly mask columns 0..31, since 150 px map onto 64."""
    predictor = SamPredictor.from_pretrained(str(tiny_model_dir))
    predictor.set_image(np.zeros((90, 150, 3), np.uint8))
    full = predictor.mask_input_from_mask(np.ones((90, 150), bool))
    assert full.shape == (64, 64)
    assert (full[:38] == 10).all() and (full[38:] == -10).all()
    assert (predictor.mask_input_from_mask(np.zeros((90, 150), bool)) == -10).all()
    half = np.zeros((90, 150), bool)
    half[:, :75] = True
    left = predictor.mask_input_from_mask(half)
    assert (left[:38, :32] == 10).all() and (left[:38, 32:] == -10).all()
    with pytest.raises(PromptError, match="90x150"):
        predictor.mask_input_from_mask(np.ones((80, 150), bool))
    # As a mask prompt, it is what predict() takes.
    predictor.predict(boxes=[[10, 10, 70, 60]], mask_input=left)


def test_default_device_is_the_one_asked_for_else_cuda_where_present(monkeypatch):
    from sam_hf.core.env import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda" and default_device("cpu") == "cpu"
    assert default_device(torch.device("cuda", 1)) == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu" and default_device("mps") == "mps"

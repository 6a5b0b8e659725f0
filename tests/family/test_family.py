"""Every SAM-family member through the same code: geometry, cache, training, reloading, predictor, pipeline, server.

Each member is a tiny configuration built in code (`sam_hf.family.tiny_config`), saved like a Hub checkpoint.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_argv
from PIL import Image

from sam_hf.config.parser import parse_args
from sam_hf.core.images import encode_images
from sam_hf.data.cache import add_image_embeddings, read_embedding
from sam_hf.data.collator import SamDataCollator
from sam_hf.data.indexing import index_objects
from sam_hf.data.sources import load_source
from sam_hf.data.transforms import SamTransform
from sam_hf.family.geometry import Geometry
from sam_hf.family.modeling import freeze_modules, load_model_and_processor
from sam_hf.family.registry import FAMILY, as_levels, family_of, tiny_config, tiny_processor
from sam_hf.inference.predictor import SamPredictor
from sam_hf.training.run import run_training

MODEL_TYPES = list(FAMILY)


@pytest.fixture(scope="module", params=MODEL_TYPES)
def member_dir(request, tmp_path_factory) -> Path:
    """A randomly initialised tiny family member with its processor, saved like a Hub checkpoint."""
    model_type = request.param
    if model_type == "edgetam":
        pytest.importorskip("timm")
    member = FAMILY[model_type]
    path = tmp_path_factory.mktemp(f"tiny-{model_type}")
    torch.manual_seed(0)
    config = tiny_config(model_type)
    member.model_class(config).save_pretrained(path)
    tiny_processor(config).save_pretrained(path)
    return path


def _rectangle_image(height: int, width: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A black image with one white rectangle (inclusive xyxy `box`), and its instance map."""
    x0, y0, x1, y1 = box
    instances = np.zeros((height, width), np.int32)
    instances[y0 : y1 + 1, x0 : x1 + 1] = 1
    image = np.repeat((instances * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return image, instances


def test_registry_is_keyed_by_model_type():
    for model_type, member in FAMILY.items():
        config = tiny_config(model_type) if model_type != "edgetam" or _has_timm() else None
        if config is None:
            continue
        assert config.model_type == model_type and family_of(config) is member
        assert member.model_class.config_class is type(config)
    with pytest.raises(ValueError, match="Unsupported model type 'clipseg'.*SAM 2.1 \\('sam2'\\)"):
        family_of("clipseg")


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def test_labels_and_boxes_follow_the_processor_on_a_non_square_image(member_dir):
    """Labels land where the processor puts the object's pixels (padded or stretched), and boxes where the
    processor's own box scaling puts them."""
    model, processor = load_model_and_processor(str(member_dir))
    geometry = family_of(model).geometry(model.config)
    height, width, box = 90, 150, (30, 20, 89, 59)
    image, instances = _rectangle_image(height, width, box)
    row = {"image": [image], "label": [instances], "boxes": [[list(box)]], "row_index": [0]}
    out = SamTransform(processor, train=False)(row)
    label = out["labels"][0][0]
    assert label.shape == (geometry.mask_side, geometry.mask_side)

    # Independently: where the processor puts the white pixels, pooled down to the mask frame.
    pixels = encode_images(processor.image_processor, image)["pixel_values"][0, 0]
    white = (pixels > pixels.min() + (pixels.max() - pixels.min()) / 2).float()
    pooled = F.interpolate(white[None, None], size=(geometry.mask_side,) * 2, mode="area")[0, 0]
    inside, expected = label > 0.5, pooled > 0.5
    iou = (inside & expected).sum() / (inside | expected).sum()
    assert iou > 0.9, f"labels and image disagree: IoU {iou:.3f}"
    if geometry.pads:
        label_h, label_w = geometry.label_shape(height, width)
        assert label_w == geometry.mask_side and label_h < geometry.mask_side  # aspect kept, padded below
        assert label[label_h:].abs().max() == 0
    else:
        assert geometry.label_shape(height, width) == (geometry.mask_side,) * 2  # stretched like the image

    theirs = processor(images=image, input_boxes=[[list(box)]], return_tensors="pt")["input_boxes"][0]
    torch.testing.assert_close(out["input_boxes"][0], theirs.float(), atol=1e-3, rtol=0)


def test_cached_features_give_the_full_forward(member_dir, nuclei_dir, tmp_path):
    model, processor = load_model_and_processor(str(member_dir))
    model.eval()
    member = family_of(model)
    ds = index_objects(load_source(str(nuclei_dir))["train"].select(range(2)))
    cached = add_image_embeddings(ds, model, processor.image_processor, dtype="float32", cache_dir=str(tmp_path))
    cached_batch = SamDataCollator()([cached.with_transform(SamTransform(processor, train=False))[i] for i in (0, 1)])
    image_batch = SamDataCollator()([ds.with_transform(SamTransform(processor, train=False))[i] for i in (0, 1)])
    levels = as_levels(cached_batch["image_embeddings"])
    assert len(levels) == member.num_levels
    assert len(as_levels(read_embedding(cached[0]))) == member.num_levels
    with torch.no_grad():
        from_cache = model(
            **member.decoder_inputs(levels),
            input_boxes=cached_batch["input_boxes"],
            multimask_output=False,
            **member.forward_kwargs,
        )
        full = model(
            pixel_values=image_batch["pixel_values"],
            input_boxes=image_batch["input_boxes"],
            multimask_output=False,
            **member.forward_kwargs,
        )
    torch.testing.assert_close(from_cache.pred_masks, full.pred_masks, atol=1e-4, rtol=1e-4)


def test_same_flags_freeze_the_same_parts(member_dir):
    model, _ = load_model_and_processor(str(member_dir))
    member = family_of(model)
    freeze_modules(model)
    image = [p for _, p in member.parts(model, member.image_side)]
    prompt = [p for _, p in member.parts(model, member.prompt_side)]
    assert image and prompt and not any(p.requires_grad for p in image + prompt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mask_decoder.") for n in trainable)
    assert not any(n.startswith("vision_encoder.") for n in trainable)


@pytest.mark.slow
def test_train_reload_predict_pipeline_and_serve(member_dir, nuclei_dir, tmp_path):
    """A few steps through the training job, then every way users load and run the result."""
    out = tmp_path / "run"
    argv = train_argv(
        member_dir, nuclei_dir, out, max_steps=3, learning_rate=1e-3, multimask_every=2,
        embedding_cache_dir=tmp_path / "cache",
    )  # fmt: skip
    run_training(*parse_args(argv))
    member = family_of(json.loads((out / "config.json").read_text())["model_type"])
    base = member.model_class.from_pretrained(member_dir)
    tuned = member.model_class.from_pretrained(out)
    assert type(tuned) is member.model_class
    # The image side is bit-identical to the base; the decoder learned.
    base_image, tuned_image = member.image_side_state(base), member.image_side_state(tuned)
    assert base_image.keys() == tuned_image.keys()
    assert all(torch.equal(base_image[k], tuned_image[k]) for k in base_image)
    base_dec, tuned_dec = base.mask_decoder.state_dict(), tuned.mask_decoder.state_dict()
    assert any(not torch.equal(base_dec[k], tuned_dec[k]) for k in base_dec)
    if member.stability_selection:
        assert tuned.config.mask_decoder_config.dynamic_multimask_via_stability is False
    card = (out / "README.md").read_text()
    facts = member.card_facts()
    assert f"model = {facts['model_class']}.from_pretrained" in card and facts["post_process_sizes"] in card
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_dice"] <= 1.0

    from sam_hf.config.arguments import DataArguments
    from sam_hf.evaluation.arguments import EvaluateArguments
    from sam_hf.evaluation.run import run_evaluation

    summary = run_evaluation(
        EvaluateArguments(
            model=[f"base={member_dir}", f"tuned={out}"],
            output_dir=str(tmp_path / "eval"),
            num_figure_images=1,
            device="cpu",  # compared below with a CPU predictor
        ),
        DataArguments(dataset_name=str(nuclei_dir), max_eval_samples=2),
    )
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    assert (tmp_path / "eval" / "base_vs_tuned.png").is_file()

    predictor = SamPredictor.from_pretrained(str(out))
    # Each image's mean Dice, worked out here from the predictor's masks and the instance maps on disk.
    for scored in summary["models"]["tuned"]["per_image"]:
        stem = Path(scored["name"]).stem
        image = np.asarray(Image.open(nuclei_dir / "images" / f"{stem}.png").convert("RGB"))
        instances = np.asarray(Image.open(nuclei_dir / "instances" / f"{stem}.png")).astype(np.int64)
        ids = [i for i in np.unique(instances) if i > 0]
        boxes = []
        for i in ids:
            ys, xs = np.nonzero(instances == i)
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
        masks = predictor(image, boxes=np.asarray(boxes, np.float32)).masks[:, 0]
        dice = [2 * (m & (instances == i)).sum() / (m.sum() + (instances == i).sum()) for m, i in zip(masks, ids)]
        assert scored["num_objects"] == len(ids)
        assert scored["dice"] == pytest.approx(float(np.mean(dice)), abs=1e-6)

    image = np.asarray(Image.open(sorted((nuclei_dir / "images").glob("*.png"))[0]).convert("RGB"))
    prediction = predictor(image, boxes=[[10, 10, 60, 50]])
    assert prediction.masks.shape == (1, 1, *image.shape[:2]) and prediction.masks.dtype == bool
    assert prediction.logits.shape[-1] == predictor.geometry.mask_side

    from transformers import pipeline

    generator = pipeline("mask-generation", model=str(out))
    generated = generator(Image.fromarray(image), points_per_crop=4, points_per_batch=16, pred_iou_thresh=0.0,
                          stability_score_thresh=0.0)  # fmt: skip
    assert all(np.asarray(m).shape == image.shape[:2] for m in generated["masks"])

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sam_hf.apps.serve.app import create_app
    from sam_hf.apps.serve.requests import decode_rle
    from sam_hf.apps.serve.settings import ServeSettings

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with TestClient(create_app(out, settings=ServeSettings(device="cpu"))) as client:
        response = client.post(
            "/segment",
            files={"image": ("i.png", buffer.getvalue(), "image/png")},
            data={"prompts": json.dumps({"boxes": [[10, 10, 60, 50]]})},
        )
    assert response.status_code == 200, response.text
    mask = decode_rle(response.json()["masks"][0][0])
    np.testing.assert_array_equal(mask, prediction.masks[0, 0])


def test_geometry_of_processors():
    assert Geometry.of_processor(tiny_processor(tiny_config("sam"))) == Geometry(128, 32, pads=True)
    assert Geometry.of_processor(tiny_processor(tiny_config("sam2"))) == Geometry(128, 32, pads=False)
    g = Geometry(100, 25, pads=True)
    assert g.resized(50, 200) == (25, 100) and g.label_shape(50, 200) == (6, 25)
    assert Geometry(100, 25, pads=False).label_shape(50, 200) == (25, 25)


@pytest.mark.parametrize("model_type", [t for t, m in FAMILY.items() if m.lora_target_modules])
def test_default_lora_targets_are_image_encoder_attention(model_type):
    from sam_hf.family.lora import resolve_target_modules

    member = FAMILY[model_type]
    model = member.model_class(tiny_config(model_type))
    freeze_modules(model)
    names = resolve_target_modules(model, list(member.lora_target_modules))
    assert names and all(n.startswith("vision_encoder.") for n in names)


@pytest.mark.parametrize("model_type", ["sam_hq", "sam2"])
@pytest.mark.slow
def test_lora_training_of_multi_level_members(model_type, nuclei_dir, tmp_path):
    """Adapters on the encoder of members whose decoder reads several feature levels: the learning encoder runs once
    for the box and the point pass, and the merged checkpoint loads with the family's own class."""
    pytest.importorskip("peft")
    import peft

    member = FAMILY[model_type]
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    config = tiny_config(model_type)
    member.model_class(config).save_pretrained(base_dir)
    tiny_processor(config).save_pretrained(base_dir)
    out = tmp_path / "run"
    argv = train_argv(
        base_dir, nuclei_dir, out, max_train_samples=2, max_eval_samples=1, learning_rate=1e-2, multimask_every=1,
        lora_rank=2,
    )  # fmt: skip
    run_training(*parse_args(argv))
    merged = member.model_class.from_pretrained(out).eval()
    base_for_adapter = member.model_class.from_pretrained(base_dir)
    member.prepare_for_training(base_for_adapter)  # the single-mask output the run trained, as the merged config says
    adapted = peft.PeftModel.from_pretrained(base_for_adapter, out / "adapter").eval()
    base = member.model_class.from_pretrained(base_dir)
    vision = {k: v for k, v in merged.vision_encoder.state_dict().items()}
    assert any(not torch.equal(v, base.vision_encoder.state_dict()[k]) for k, v in vision.items())
    pixels = torch.rand(1, 3, *(member.geometry(config).image_size,) * 2)
    boxes = torch.tensor([[[10.0, 10.0, 60.0, 50.0]]])
    with torch.no_grad():
        a = merged(pixel_values=pixels, input_boxes=boxes, multimask_output=False, **member.forward_kwargs)
        b = adapted(pixel_values=pixels, input_boxes=boxes, multimask_output=False, **member.forward_kwargs)
    torch.testing.assert_close(a.pred_masks, b.pred_masks, atol=1e-4, rtol=1e-4)

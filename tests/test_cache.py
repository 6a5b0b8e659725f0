from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamModel, SamProcessor

from sam_hf import SamDataCollator, SamDiceCELoss, SamTransform, freeze_modules
from sam_hf.cache import add_image_embeddings
from sam_hf.data import index_objects, load_source, scale_coords


@pytest.fixture()
def small_folder(nuclei_dir, tmp_path):
    root = tmp_path / "nuclei"
    for sub in ("images", "instances"):
        (root / sub).mkdir(parents=True)
        for path in sorted((nuclei_dir / sub).iterdir())[:3]:
            shutil.copy(path, root / sub / path.name)
    return root


def _loss_and_grads(model, batch):
    model.zero_grad()
    key = "image_embeddings" if "image_embeddings" in batch else "pixel_values"
    out = model(**{key: batch[key]}, input_boxes=batch["input_boxes"], multimask_output=False)
    loss, _ = SamDiceCELoss()(out.pred_masks[:, :, 0], batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.mask_decoder.named_parameters() if p.grad is not None}


def test_cached_and_uncached_training_agree(tiny_model_dir, small_folder, tmp_path):
    model = SamModel.from_pretrained(tiny_model_dir)
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    ds = index_objects(load_source(str(small_folder))["train"])
    cached = add_image_embeddings(ds, model, processor.image_processor, dtype="float32", cache_dir=str(tmp_path))
    transform = SamTransform(processor, train=False, max_objects_per_image=8)
    plain_batch = SamDataCollator()([ds.with_transform(transform)[i] for i in range(3)])
    cached_batch = SamDataCollator()([cached.remove_columns("image").with_transform(transform)[i] for i in range(3)])
    assert "pixel_values" not in cached_batch and cached_batch["image_embeddings"].shape == (3, 64, 16, 16)
    for key in ("input_boxes", "labels", "original_sizes", "reshaped_input_sizes"):
        torch.testing.assert_close(plain_batch[key], cached_batch[key], msg=key)
    loss_a, grads_a = _loss_and_grads(model, plain_batch)
    loss_b, grads_b = _loss_and_grads(model, cached_batch)
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def n_caches(folder) -> int:
    """Embedding caches are named by their 32-hex-digit fingerprint (datasets may add its own cache-*.arrow files)."""
    return sum(1 for p in folder.glob("*.arrow") if len(p.stem) == 32 and not p.stem.startswith("cache-"))


def test_stale_cache_is_never_used(tiny_model_dir, small_folder, tmp_path, caplog):
    model = SamModel.from_pretrained(tiny_model_dir)
    ip = SamProcessor.from_pretrained(tiny_model_dir).image_processor
    ds = index_objects(load_source(str(small_folder))["train"])
    cache = tmp_path / "cache"

    def build(dataset):
        out = add_image_embeddings(dataset, model, ip, cache_dir=str(cache))
        return np.stack([np.asarray(e) for e in out["image_embeddings"]])

    first = build(ds)
    assert n_caches(cache) == 1
    with caplog.at_level(logging.INFO, logger="sam_hf"):
        np.testing.assert_array_equal(build(ds), first)
    assert "reusing cached image embeddings" in caplog.text
    assert n_caches(cache) == 1

    with torch.no_grad():  # one weight of the encoder changes -> a new cache
        model.vision_encoder.neck.conv1.weight[0, 0, 0, 0] += 1.0
    changed_weight = build(ds)
    assert n_caches(cache) == 2
    assert not np.array_equal(changed_weight, first)

    image_path = sorted((small_folder / "images").iterdir())[0]  # one image changes, same file name -> a new cache
    pixels = np.asarray(Image.open(image_path).convert("RGB")).copy()
    pixels[:20, :20] = 255 - pixels[:20, :20]
    Image.fromarray(pixels).save(image_path)
    ds2 = index_objects(load_source(str(small_folder))["train"])
    changed_image = build(ds2)
    assert n_caches(cache) == 3
    assert not np.array_equal(changed_image[0], changed_weight[0])
    np.testing.assert_array_equal(changed_image[1:], changed_weight[1:])


def test_scale_coords_matches_processor(tiny_model_dir):
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    image = np.zeros((150, 420, 3), np.uint8)
    boxes = np.array([[10.0, 20.0, 200.0, 140.0], [0.0, 0.0, 419.0, 149.0]])
    enc = processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
    reshaped = tuple(int(v) for v in enc["reshaped_input_sizes"][0])
    torch.testing.assert_close(scale_coords(boxes, (150, 420), reshaped), enc["input_boxes"][0].float())
    points = [[[30.0, 40.0], [419.0, 149.0]]]  # one prompt with two points
    enc = processor(images=image, input_points=[points], input_labels=[[[1, 0]]], return_tensors="pt")
    torch.testing.assert_close(scale_coords(points, (150, 420), reshaped), enc["input_points"][0].float())

"""GPU paths: skipped without CUDA (CI has none); run on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BASE
from transformers import SamModel, SamProcessor

from sam_hf import SamDataCollator, SamDiceCELoss, SamTransform, freeze_modules
from sam_hf.data.cache import add_image_embeddings, read_embedding
from sam_hf.data.indexing import index_objects
from sam_hf.data.sources import load_source

pytestmark = pytest.mark.gpu


def full_fp32():
    """cuDNN's convolutions in full fp32. By default they run in TF32 (10 mantissa bits) on Ampere and newer GPUs:
    the reduced-precision path, which is not what an fp32-against-CPU comparison checks."""
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)


def test_cache_built_on_cuda_matches_cpu(tiny_model_dir, nuclei_dir, tmp_path):
    model = SamModel.from_pretrained(tiny_model_dir)
    ip = SamProcessor.from_pretrained(tiny_model_dir).image_processor
    ds = index_objects(load_source(str(nuclei_dir))["train"].select(range(6)))
    cpu = add_image_embeddings(ds, model, ip, dtype="float32", cache_dir=str(tmp_path / "cpu"))
    with full_fp32():
        cuda = add_image_embeddings(
            ds, model, ip, dtype="float32", cache_dir=str(tmp_path / "cuda"), device="cuda", num_workers=2
        )
    bf16 = add_image_embeddings(
        ds, model, ip, cache_dir=str(tmp_path / "bf16"), device="cuda", autocast_dtype=torch.bfloat16
    )
    assert next(model.parameters()).device.type == "cpu", "the model goes back where it was"
    for i in range(len(ds)):
        reference = read_embedding(cpu[i])
        torch.testing.assert_close(read_embedding(cuda[i]), reference, rtol=1e-3, atol=1e-4)
        # bf16 keeps about 3 significant digits: compare relative to the embedding's scale.
        scale = reference.abs().max()
        assert (read_embedding(bf16[i]) - reference).abs().max() < 0.05 * scale
    assert cpu[0]["original_sizes"] == cuda[0]["original_sizes"] == bf16[0]["original_sizes"]


def test_cached_training_step_on_cuda_matches_cpu(nuclei_dir, tmp_path):
    model = SamModel.from_pretrained(TINY_BASE)
    processor = SamProcessor.from_pretrained(TINY_BASE)
    freeze_modules(model)
    ds = index_objects(load_source(str(nuclei_dir))["train"].select(range(2)))
    cached = add_image_embeddings(ds, model, processor.image_processor, dtype="float32", cache_dir=str(tmp_path))
    train = cached.remove_columns("image").with_transform(
        SamTransform(processor, train=False, max_objects_per_image=4)
    )
    batch = SamDataCollator()([train[0], train[1]])
    losses = {}
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        with full_fp32():
            out = model(
                image_embeddings=batch["image_embeddings"].to(device),
                input_boxes=batch["input_boxes"].to(device),
                multimask_output=False,
            )
            loss, _ = SamDiceCELoss()(out.pred_masks[:, :, 0], batch["labels"].to(device))
            loss.backward()
        losses[device] = loss.item()
    assert abs(losses["cpu"] - losses["cuda"]) < 1e-3 * max(1.0, abs(losses["cpu"]))


def test_object_crops_are_encoded_in_batches_on_cuda():
    import numpy as np

    from sam_hf import SamPredictor
    from sam_hf.inference.windowed import ObjectCropPredictor

    image = np.random.default_rng(0).integers(0, 255, (150, 220, 3), np.uint8)
    boxes = [[10, 10, 30, 25], [100, 40, 140, 90], [180, 120, 215, 145], [50, 100, 60, 112]]
    cuda = ObjectCropPredictor(SamPredictor.from_pretrained(str(TINY_BASE), device="cuda"), scale=3)
    assert cuda.batch_size == 8
    cpu = ObjectCropPredictor(SamPredictor.from_pretrained(str(TINY_BASE)), scale=3)
    with full_fp32():
        on_cuda = cuda(image, boxes=boxes).logits
    on_cpu = cpu(image, boxes=boxes).logits
    scale = float(np.abs(on_cpu).max())
    assert scale > 1.0, "logits large enough for the comparison to mean something"
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=0, atol=1e-4 * scale)


def test_point_crops_and_background_points_loss_on_cuda_matches_cpu(nuclei_dir):
    """The loss with point-only rows and background points (the demo's training path) is the same on CUDA."""
    from transformers import TrainingArguments

    from sam_hf import SamTrainer
    from sam_hf.data.windows import crop_objects

    processor = SamProcessor.from_pretrained(TINY_BASE)
    source = load_source(str(nuclei_dir))["train"].select(range(1))
    rows = index_objects(crop_objects(source, 6, point_scale=12, point_every=2), "instance")
    transform = SamTransform(
        processor, train=True, point_prompts=True, background_points=True, mask_type="instance", seed=0
    )
    batch = SamDataCollator()([{k: v[0] for k, v in transform(rows[i : i + 1]).items()} for i in range(8)])
    assert batch["point_only"].any() and "background_points" in batch
    losses = {}
    for device in ("cpu", "cuda"):
        model = SamModel.from_pretrained(TINY_BASE).to(device)
        freeze_modules(model)
        model.train()
        args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=device == "cpu")
        trainer = SamTrainer(model=model, args=args, processing_class=processor.image_processor, multimask_every=8)
        with full_fp32():
            losses[device] = trainer.compute_loss(model, {k: v.to(device) for k, v in batch.items()}).item()
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)

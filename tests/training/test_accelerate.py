"""A real 2-process CPU run through `accelerate launch`, as users start multi-GPU training."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import launch_two_processes
from PIL import Image
from safetensors.torch import load_file


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe", [["--multimask_every", "0"], [], ["--multimask_training"]], ids=["box-only", "default", "multimask"]
)
def test_two_process_accelerate_launch(tiny_model_dir, nuclei_dir, tmp_path, recipe):
    """DDP runs without an unused-parameter search: with a point pass (by default and with --multimask_training) every
    decoder parameter takes part; box-only (--multimask_every 0), the multimask MLPs are frozen."""
    from transformers import SamModel, pipeline

    out = tmp_path / "ddp"
    train_args = (
        "--max_steps 4 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --learning_rate 1e-3 "
        "--max_objects_per_image 8 --max_eval_samples 4 --eval_strategy no --save_strategy no --report_to none "
        "--logging_steps 1 --dataloader_num_workers 0 --eval_before_training false --use_cpu "
        "--log_level info --log_level_replica info"
    )
    log = launch_two_processes(tiny_model_dir, nuclei_dir, out, tmp_path / "cache", train_args, *recipe)
    assert "`world_size`: 2" in (out / "README.md").read_text(), "the run must have used two processes"
    # The embedding cache is built once, by the main process (one file for train, one for eval), and rank 1 reads it.
    caches = [p for p in (tmp_path / "cache").glob("*.arrow") if len(p.stem) == 32]
    assert len(caches) == 2
    assert len(re.findall(r"cached \d+ image embeddings in", log)) == 2, "built more than once"
    assert log.count("reusing cached image embeddings") == 2, "rank 1 did not read the main process's cache"

    SamModel.from_pretrained(out)  # raises if the checkpoint is not loadable
    base, tuned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for name in base:
        if name.startswith(("vision_encoder.", "prompt_encoder.", "shared_image_embedding.")):
            assert torch.equal(base[name], tuned[name]), f"frozen tensor {name} changed"
    assert any(not torch.equal(base[n], tuned[n]) for n in base if n.startswith("mask_decoder.")), "decoder unchanged"
    # The IoU head learns in every recipe (at least from the box-prompted mask); the multimask MLPs only with a point
    # pass, and are frozen otherwise so that DDP waits for no gradient that never comes.
    iou_head = [n for n in base if n.startswith("mask_decoder.iou_prediction_head.")]
    assert any(not torch.equal(base[n], tuned[n]) for n in iou_head)
    multimask_mlps = [
        n for n in base if n.startswith(tuple(f"mask_decoder.output_hypernetworks_mlps.{k}." for k in (1, 2, 3)))
    ]
    assert any(not torch.equal(base[n], tuned[n]) for n in multimask_mlps) == (recipe != ["--multimask_every", "0"])
    generator = pipeline("mask-generation", model=str(out), points_per_batch=16)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3)).astype(np.uint8))
    result = generator(image, points_per_crop=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert all(m.shape == (64, 80) for m in result["masks"])

"""LoRA adapters on the image encoder (`--lora_rank`): what trains, what is saved, and how it loads back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, launch_two_processes
from safetensors.torch import load_file, save_file
from transformers import SamModel, SamProcessor

peft = pytest.importorskip("peft")

from sam_hf import SamDiceCELoss, SamTransform, freeze_modules  # noqa: E402
from sam_hf.config.parser import parse_args  # noqa: E402
from sam_hf.family.lora import LORA_TARGET_MODULES, add_lora_adapters, resolve_target_modules  # noqa: E402
from sam_hf.family.modeling import count_parameters, freeze_unused_decoder_outputs  # noqa: E402
from sam_hf.training.run import run_training  # noqa: E402

# 6 training images, 4 steps, checkpoints at steps 2 and 4; rank 4 on the default targets (every `qkv`).
ARGS = (
    "--lora_rank 4 --max_steps 4 --per_device_train_batch_size 2 --learning_rate 1e-3 --max_train_samples 6 "
    "--max_eval_samples 2 --max_objects_per_image 4 --box_jitter 5 --eval_strategy steps --eval_steps 2 "
    "--save_strategy steps --save_steps 2 --load_best_model_at_end --metric_for_best_model dice --logging_steps 1 "
    "--report_to none --seed 3 --use_cpu"  # bit-equal resumes are checked: on the CPU where CUDA is present too
)
# Merged weights against adapter + base: the same sums in another order (W x + s B A x against (W + s B A) x).
ATOL, RTOL = 1e-5, 1e-4


def _argv(model_dir, nuclei_dir, out, *extra):
    return [
        *["--model_name_or_path", str(model_dir), "--dataset_name", str(nuclei_dir), "--output_dir", str(out)],
        *ARGS.split(),
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, nuclei_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    metrics = run_training(*parse_args(_argv(tiny_model_dir, nuclei_dir, out)))
    return out, metrics


def _outputs(model, seed=0):
    torch.manual_seed(seed)
    pixels = torch.randn(2, 3, 256, 256)
    boxes = torch.tensor([[[10.0, 20.0, 90.0, 120.0], [100.0, 100.0, 200.0, 180.0]]] * 2)
    with torch.no_grad():
        return model.eval()(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks


@pytest.mark.slow
def test_output_layout_card_and_counts(lora_run):
    out, metrics = lora_run
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "eval_results.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "adapter" / "README.md").exists()
    # Without an adapter_config.json beside it, transformers loads the merged weights as a plain checkpoint.
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    # Checkpoints hold the adapter, which Trainer resumes from and which peft loads.
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert 0 <= metrics["eval_dice"] <= 1 and 0 <= metrics["base_eval_dice"] <= 1
    card = (out / "README.md").read_text()
    assert "LoRA adapters:** rank 4, alpha 4" in card and "on `qkv` (4 linear layers of the image encoder" in card
    assert "6,144 adapter" in card and "`adapter/`" in card and "merged into this checkpoint" in card
    # 6,144 LoRA parameters (4 layers x (96 x 4 + 4 x 288)) counted in both the trainable and the total counts.
    model = SamModel.from_pretrained(out)
    total = sum(p.numel() for p in model.parameters())
    assert f"/ total {total + 6144:,}" in card
    assert "vision_encoder (base weights; LoRA adapters trained)" in card


@pytest.mark.slow
def test_merged_equals_adapter_and_base_encoder_unchanged(lora_run, tiny_model_dir):
    out, _ = lora_run
    merged = SamModel.from_pretrained(out)
    adapted = peft.PeftModel.from_pretrained(SamModel.from_pretrained(tiny_model_dir), out / "adapter")
    a, b = _outputs(adapted), _outputs(merged)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(a, _outputs(SamModel.from_pretrained(tiny_model_dir)), atol=1e-4), "nothing trained"

    base, tuned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert base.keys() == tuned.keys()
    for name in base:
        if name.endswith(".attn.qkv.weight"):
            # The only change merging makes to the encoder: W + (alpha / r) B A, from the saved adapter.
            prefix = "base_model.model." + name.removesuffix(".weight")
            delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
            assert delta.abs().max() > 0, f"{name}: the adapter did not train"
            torch.testing.assert_close(tuned[name], base[name] + delta, atol=1e-6, rtol=0)
        elif name.startswith("mask_decoder."):
            continue  # trained in full (with the default recipe, IoU head and multimask outputs included)
        else:
            # Every other encoder weight (biases, proj, MLPs, norms) and the prompt encoder.
            assert torch.equal(base[name], tuned[name]), f"frozen tensor {name} changed"
    assert any(not torch.equal(base[n], tuned[n]) for n in base if n.startswith("mask_decoder.transformer."))


def test_only_adapters_and_decoder_get_gradients(tiny_model_dir, nuclei_dir):
    """Every trainable parameter gets a gradient (DDP runs without an unused-parameter search), and only those."""
    import datasets

    from sam_hf.data.collator import SamDataCollator
    from sam_hf.data.indexing import index_objects
    from sam_hf.data.sources import load_source

    model = SamModel.from_pretrained(tiny_model_dir)
    processor = SamProcessor.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    freeze_unused_decoder_outputs(model, train_iou_head=False)  # box-only DiceCE below reaches no IoU head
    before = count_parameters(model)
    model = add_lora_adapters(model, rank=2, alpha=8, target_modules=["qkv", "proj"])
    after = count_parameters(model)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 4 * 2 * 2 and after.trainable - before.trainable == sum(p.numel() for p in lora.values())
    assert after.total - before.total == after.trainable - before.trainable
    source = load_source(str(nuclei_dir), None, "image", "label")
    ds = source["train"] if isinstance(source, datasets.DatasetDict) else source
    ds = index_objects(ds.select(range(2))).with_transform(SamTransform(processor, train=True, seed=0))
    batch = SamDataCollator()([ds[0], ds[1]])
    model.train()
    outputs = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    loss, _ = SamDiceCELoss()(outputs.pred_masks[:, :, 0], batch["labels"])
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    others = {n for n in trainable if "lora_" not in n}
    assert all(".mask_decoder." in n and ".modules_to_save.default." in n for n in others), others
    assert not any("iou_prediction_head" in n or "output_hypernetworks_mlps.modules" in n for n in trainable)
    assert all(".vision_encoder." in n for n in lora)


def _resume(straight, tmp_path, name, model_dir, nuclei_dir, tamper=False):
    out = tmp_path / name
    shutil.copytree(straight / "checkpoint-2", out / "checkpoint-2")
    if tamper:
        # Proves the adapter is read from the checkpoint: the same seed alone would reproduce the straight run.
        path = out / "checkpoint-2" / "adapter_model.safetensors"
        save_file({k: v * 2 if "lora_B" in k else v for k, v in load_file(path).items()}, path)
    argv = _argv(model_dir, nuclei_dir, out, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    run_training(*parse_args(argv + ["--eval_before_training", "false"]))
    return out


@pytest.mark.slow
def test_resume_from_checkpoint_matches_straight_run(lora_run, tiny_model_dir, nuclei_dir, tmp_path):
    straight, _ = lora_run
    resumed = _resume(straight, tmp_path, "resumed", tiny_model_dir, nuclei_dir)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        different = [n for n in a if not torch.equal(a[n], b[n])]
        assert not different, f"{name}: {len(different)} tensors differ after resume, e.g. {different[:3]}"
    tampered = _resume(straight, tmp_path, "tampered", tiny_model_dir, nuclei_dir, tamper=True)
    a, b = load_file(straight / "model.safetensors"), load_file(tampered / "model.safetensors")
    assert any(not torch.equal(a[n], b[n]) for n in a if n.endswith("qkv.weight"))


@pytest.mark.slow
def test_lora_merge_false_keeps_only_the_adapter(lora_run, tiny_model_dir, nuclei_dir, tmp_path):
    out = tmp_path / "adapter-only"
    argv = _argv(tiny_model_dir, nuclei_dir, out, "--lora_merge", "false", "--max_steps", "1", "--eval_strategy")
    run_training(*parse_args(argv + ["no", "--save_strategy", "no", "--eval_before_training", "false"]))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained(base" in card and "holds no merged weights" in card
    config = peft.PeftConfig.from_pretrained(out / "adapter")
    assert config.base_model_name_or_path == str(tiny_model_dir) and config.r == 4


@pytest.mark.slow
def test_merged_checkpoint_loads_without_peft(lora_run):
    """`SamModel.from_pretrained` and the pipeline load the merged output dir with peft unimportable."""
    out, _ = lora_run
    script = f"""
import sys
sys.modules["peft"] = None  # any `import peft` now raises ImportError
import numpy as np
from PIL import Image
from transformers import SamModel, pipeline
SamModel.from_pretrained({str(out)!r})
generator = pipeline("mask-generation", model={str(out)!r}, points_per_batch=16)
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3)).astype(np.uint8))
result = generator(image, points_per_crop=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
assert all(m.shape == (64, 80) for m in result["masks"])
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_lora_arguments_refused(monkeypatch):
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]
    _, _, sam_args, _ = parse_args(base + ["--lora_rank", "4"])
    assert sam_args.cache_embeddings is False and sam_args.lora_merge and sam_args.lora_alpha is None
    _, _, sam_args, _ = parse_args(base + ["--lora_rank", "0"])
    assert sam_args.cache_embeddings is True, "rank 0 means no adapters"
    with pytest.raises(ValueError, match="--cache_embeddings true cannot be combined with --lora_rank"):
        parse_args(base + ["--lora_rank", "4", "--cache_embeddings", "true"])
    with pytest.raises(ValueError, match="--freeze_vision_encoder false trains it in full"):
        parse_args(base + ["--lora_rank", "4", "--freeze_vision_encoder", "false"])
    with pytest.raises(ValueError, match="--lora_target_modules configure LoRA adapters, which need --lora_rank"):
        parse_args(base + ["--lora_target_modules", "qkv"])
    with pytest.raises(ValueError, match="--lora_rank must be >= 1"):
        parse_args(base + ["--lora_rank", "-2"])
    with pytest.raises(ValueError, match="--lora_dropout must be in"):
        parse_args(base + ["--lora_rank", "4", "--lora_dropout", "1.5"])
    import sam_hf.family.lora

    monkeypatch.setattr("sam_hf.config.arguments.is_peft_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'sam_hf\[lora\]'"):
        parse_args(base + ["--lora_rank", "4"])
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'sam_hf\[lora\]'"):
        sam_hf.family.lora.require_peft()


def test_target_modules_resolved_and_checked(tiny_model_dir):
    model = SamModel.from_pretrained(tiny_model_dir)
    freeze_modules(model)
    assert model.config.model_type in LORA_TARGET_MODULES
    names = resolve_target_modules(model, LORA_TARGET_MODULES[model.config.model_type])
    assert names == [f"vision_encoder.layers.{i}.attn.qkv" for i in range(4)]
    with pytest.raises(ValueError, match="'q_proj' matches mask_decoder.* which trains in full"):
        resolve_target_modules(model, ["q_proj"])
    with pytest.raises(ValueError, match="'nope' matches no module.*named .*qkv"):
        resolve_target_modules(model, ["nope"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        resolve_target_modules(model, ["attn"])


def test_prompt_encoder_trained_with_adapters_stays_tied(tiny_model_dir):
    """With --freeze_prompt_encoder false peft copies the prompt encoder and the shared positional embedding apart;
    they stay one tensor, so the merged model computes what the adapted one did."""
    from sam_hf.family.lora import merged_model

    model = SamModel.from_pretrained(tiny_model_dir)
    freeze_modules(model, freeze_prompt_encoder=False)
    freeze_unused_decoder_outputs(model)
    model = add_lora_adapters(model, rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "positional_embedding" in n and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    inner = model.base_model.model
    shared = inner.shared_image_embedding.modules_to_save["default"].positional_embedding
    assert inner.prompt_encoder.modules_to_save["default"].shared_embedding.positional_embedding is shared
    merged = merged_model(model)
    shared = merged.shared_image_embedding.positional_embedding
    assert merged.prompt_encoder.shared_embedding.positional_embedding is shared
    torch.testing.assert_close(_outputs(merged), _outputs(model), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_two_process_accelerate_launch_with_lora(tiny_model_dir, nuclei_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) and --lora_rank 4: DDP finds a gradient for every trainable
    parameter without an unused-parameter search, no embedding cache is built, and the outputs load."""
    out = tmp_path / "ddp"
    train_args = (
        "--lora_rank 4 --max_steps 3 --per_device_train_batch_size 2 --learning_rate 1e-3 --max_objects_per_image 4 "
        "--max_train_samples 8 --max_eval_samples 2 --eval_strategy no --save_strategy steps --save_steps 2 "
        "--report_to none --logging_steps 1 --dataloader_num_workers 0 --eval_before_training false --use_cpu "
        "--log_level info --log_level_replica info"
    )
    log = launch_two_processes(tiny_model_dir, nuclei_dir, out, tmp_path / "cache", train_args)
    assert "`world_size`: 2" in (out / "README.md").read_text(), "the run must have used two processes"
    assert log.count("no embedding cache, the encoder runs at every step") == 2
    assert not list((tmp_path / "cache").glob("*.arrow")), "no cache with adapters"
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    merged = SamModel.from_pretrained(out)
    adapted = peft.PeftModel.from_pretrained(SamModel.from_pretrained(tiny_model_dir), out / "adapter")
    torch.testing.assert_close(_outputs(merged), _outputs(adapted), atol=ATOL, rtol=RTOL)
    base, tuned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(base[n], tuned[n]) for n in base if n.endswith("qkv.weight")), "adapters unchanged"
    frozen = [n for n in base if n.startswith(("prompt_encoder.", "vision_encoder.neck."))]
    assert frozen and all(torch.equal(base[n], tuned[n]) for n in frozen)


def test_overwrite_output_dir_removes_a_previous_adapter(tmp_path):
    from transformers import TrainingArguments

    from sam_hf.training.output_dir import check_output_dir

    out = tmp_path / "used"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "notes.txt").write_text("kept")
    check_output_dir(TrainingArguments(output_dir=str(out), report_to="none"), overwrite_output_dir=True)
    assert not (out / "adapter").exists() and (out / "notes.txt").is_file()

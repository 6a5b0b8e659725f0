"""Training-side reliability: evaluation memory with many objects per image, and a full disk during a save."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from transformers import SamModel, SamProcessor, TrainingArguments

from sam_hf import SamDataCollator, SamDiceCELoss, SamTrainer, SamTransform
from sam_hf.config.parser import parse_args
from sam_hf.data.indexing import index_objects
from sam_hf.training.metrics import compute_metrics
from sam_hf.training.output_dir import check_output_dir, is_disk_full
from sam_hf.training.run import run_training


def _grid_dataset(sizes_and_counts: list[tuple[int, int, int]]) -> datasets.Dataset:
    """One row per `(height, width, n)`: `n` objects of 2 x 2 pixels on a 3-pixel grid of a noisy image."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for h, w, n in sizes_and_counts:
        instances = np.zeros((h, w), np.uint16)
        ys, xs = np.mgrid[0 : h - 1 : 3, 0 : w - 1 : 3]
        assert ys.size >= n
        for k, (y, x) in enumerate(zip(ys.ravel()[:n], xs.ravel()[:n]), start=1):
            instances[y : y + 2, x : x + 2] = k
        images.append(Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)))
        labels.append(Image.fromarray(instances))
    ds = datasets.Dataset.from_dict({"image": images, "label": labels})
    return index_objects(ds.cast_column("image", datasets.Image()).cast_column("label", datasets.Image()))


# Evaluates the saved dataset with SamTrainer and prints the growth of the process's peak resident memory during
# `evaluate()` (what the kernel counts, torch's allocations included).
MEMORY_CHILD = """
import json, resource, sys
import datasets, torch
torch.set_num_threads(1)
from transformers import SamModel, SamProcessor, TrainingArguments
from sam_hf import SamDataCollator, SamTrainer, SamTransform
from sam_hf.training.metrics import compute_metrics

model, processor = SamModel.from_pretrained(sys.argv[1]), SamProcessor.from_pretrained(sys.argv[1])
ds = datasets.load_from_disk(sys.argv[2]).with_transform(SamTransform(processor, train=False, with_instances=True))
args = TrainingArguments(output_dir=sys.argv[3], report_to="none", use_cpu=True, per_device_eval_batch_size=1)
trainer = SamTrainer(
    model=model, args=args, eval_dataset=ds, data_collator=SamDataCollator(),
    processing_class=processor.image_processor, compute_metrics=compute_metrics,
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
metrics = trainer.evaluate()
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"growth_mib": growth / 1024, "num_objects": metrics["eval_num_objects"]}))
"""


@pytest.mark.slow
def test_evaluation_memory_does_not_grow_with_objects_per_image(tiny_model_dir, tmp_path):
    """Decoding all 1,000 objects of the image at once costs about 0.55 MB each in the tiny model's decoder and
    labels (measured: +685 MiB peak), 60,000 of them 22.7 GB; in chunks of 64 the evaluation stays near +95 MiB."""
    _grid_dataset([(120, 120, 1000)]).save_to_disk(tmp_path / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", MEMORY_CHILD, str(tiny_model_dir), str(tmp_path / "data"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_objects"] == 1000
    assert result["growth_mib"] < 250, f"evaluation raised the peak memory by {result['growth_mib']:.0f} MiB"


def test_chunked_evaluation_matches_one_pass_over_every_object(tiny_model_dir, tmp_path):
    """Objects decoded 3 at a time give the loss of one decoder call over all objects of the batch (computed here by
    hand from the transform's dense labels), and the decoder never sees more than batch x 3 objects."""
    torch.manual_seed(0)
    model, processor = SamModel.from_pretrained(tiny_model_dir), SamProcessor.from_pretrained(tiny_model_dir)
    data = _grid_dataset([(40, 50, 7), (30, 30, 2)])
    # Reference: every object of both images in one call, labels from the transform (not from the trainer).
    dense = data.with_transform(SamTransform(processor, train=False))
    losses, ious, counts = [], [], []
    with torch.no_grad():
        for row in (dense[0], dense[1]):
            out = model(
                pixel_values=row["pixel_values"][None], input_boxes=row["input_boxes"][None], multimask_output=False
            )
            logits, labels = out.pred_masks[:, :, 0], row["labels"][None]
            loss, n = SamDiceCELoss()(logits, labels)
            pred, target = logits[0] > 0, labels[0] > 0.5
            inter = (pred & target).flatten(1).sum(1).float()
            union = (pred | target).flatten(1).sum(1).float()
            losses.append(SamDiceCELoss().per_object(logits[0], labels[0]))
            ious.append((out.iou_scores[0, :, 0] - inter / union) ** 2)
            counts.append(n)
    expected = (torch.cat(losses).mean() + torch.cat(ious).mean()).item()
    assert counts == [7, 2]

    decoded: list[int] = []
    model.mask_decoder.register_forward_hook(
        lambda module, args, kwargs, out: decoded.append(kwargs["sparse_prompt_embeddings"].shape[:2].numel()),
        with_kwargs=True,
    )
    encoded: list[int] = []
    model.vision_encoder.register_forward_hook(lambda *_: encoded.append(1))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    eval_ds = data.with_transform(SamTransform(processor, train=False, with_instances=True))
    assert "labels" not in eval_ds[0]  # the trainer makes each chunk's labels itself

    def evaluate(chunk_size: int) -> dict[str, float]:
        return SamTrainer(
            model=model,
            args=args,
            eval_dataset=eval_ds,
            data_collator=SamDataCollator(),
            processing_class=processor.image_processor,
            compute_metrics=compute_metrics,
            eval_chunk_size=chunk_size,
        ).evaluate()

    chunked = evaluate(3)
    assert chunked["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert chunked["eval_num_objects"] == 9
    # Chunks of 3 slots: image A's 7 objects in 3 + 3 + 1, image B's 2 beside A's first chunk.
    assert decoded == [6, 3, 1] and len(encoded) == 1
    whole = evaluate(64)
    assert whole["eval_dice"] == pytest.approx(chunked["eval_dice"], abs=1e-12)
    assert whole["eval_loss"] == pytest.approx(expected, rel=1e-5)


def _tiny_run_argv(model_dir, data_dir, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_train_samples", "4",
        "--max_eval_samples", "2", "--max_objects_per_image", "4", "--eval_strategy", "no",
        "--eval_before_training", "false", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none",
        "--use_cpu", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_save(tiny_model_dir, nuclei_dir, tmp_path, monkeypatch, caplog):
    """The weights writer of checkpoint-2 finds the disk full: the error names the folder and the free space, the
    partial folder (config.json only) is removed with a log line, and the rerun points at checkpoint-1."""
    import transformers.modeling_utils

    real = transformers.modeling_utils.safe_save_file
    calls: list[str] = []

    def writer(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if "checkpoint-2" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", writer)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sam_hf"), pytest.raises(OSError) as err:
        run_training(*parse_args(_tiny_run_argv(tiny_model_dir, nuclei_dir, out)))
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert f"saving a checkpoint to {out / 'checkpoint-2'}, removed again as incomplete" in message
    assert "GB free there" in message and f"--resume_from_checkpoint {out / 'checkpoint-1'}" in message
    assert any("checkpoint-2" in c for c in calls)
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert f"Removed the incomplete checkpoint {out / 'checkpoint-2'}" in caplog.text
    # The rerun is refused with advice that works: the complete checkpoint.
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    with pytest.raises(ValueError) as refused:
        check_output_dir(TrainingArguments(output_dir=str(out), report_to="none"))
    assert f"Pass --resume_from_checkpoint {out / 'checkpoint-1'} to continue" in str(refused.value)


def test_full_disk_during_the_final_save_names_the_directory(tiny_model_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True)
    trainer = SamTrainer(model=SamModel.from_pretrained(tiny_model_dir), args=args)
    with pytest.raises(OSError) as err:
        trainer.save_model()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and f"while saving the model to {out} (" in message
    assert "GB free there" in message and f"--resume_from_checkpoint {out / 'checkpoint-3'}" in message


def test_an_incomplete_checkpoint_is_never_recommended(tmp_path):
    """A save killed part-way (checkpoint-3 holds only config.json, checkpoint-4 a truncated trainer_state.json)."""
    out = tmp_path / "run"
    for step in (2, 3, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "config.json").write_text("{}")
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')
    with pytest.raises(ValueError) as err:
        check_output_dir(TrainingArguments(output_dir=str(out), report_to="none"))
    message = str(err.value)
    assert f"--resume_from_checkpoint {out / 'checkpoint-2'} to continue" in message
    assert "checkpoint-3, checkpoint-4 (a save that did not finish: not resumable)" in message
    # Following stale advice to resume from an incomplete checkpoint is refused up front, with the right one.
    resume = TrainingArguments(output_dir=str(out), report_to="none", resume_from_checkpoint=str(out / "checkpoint-4"))
    with pytest.raises(ValueError) as err:
        check_output_dir(resume)
    assert f"{out / 'checkpoint-4'} is incomplete" in str(err.value)
    assert f"the last complete one, --resume_from_checkpoint {out / 'checkpoint-2'}" in str(err.value)
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(ValueError) as err:
        check_output_dir(TrainingArguments(output_dir=str(out), report_to="none"))
    assert "--resume_from_checkpoint" not in str(err.value) and "--overwrite_output_dir" in str(err.value)


def test_disk_full_is_recognised_from_writers_that_keep_no_errno():
    from safetensors import SafetensorError

    # The text safetensors raises on a full disk (Rust's io::Error), and the same wrapped by a caller.
    rust = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    assert is_disk_full(SafetensorError(rust))
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))

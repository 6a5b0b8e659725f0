"""Exact resume: a run killed after a checkpoint and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

# Trains 6 images (3 steps per epoch) for 8 steps, so the kill at step 4 falls inside the second epoch; objects are
# sampled (up to 4 of each image's nuclei) and boxes jittered, the randomness a resumed run used to redraw.
ARGS = (
    "--max_steps 8 --per_device_train_batch_size 2 --learning_rate 1e-3 --max_train_samples 6 --max_eval_samples 2 "
    "--max_objects_per_image 4 --box_jitter 5 --eval_strategy no --eval_before_training false --save_strategy steps "
    "--save_steps 4 --logging_steps 1 --report_to none --seed 3 --dataloader_num_workers {workers} --use_cpu"
)

# Runs scripts/train.py's job with a callback that SIGKILLs the process right after checkpoint-4 is written.
KILLER = """
import os, signal, sys
from transformers import TrainerCallback
import sam_hf.training.trainer

class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

init = sam_hf.training.trainer.SamTrainer.__init__
def patched(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(Kill())
sam_hf.training.trainer.SamTrainer.__init__ = patched
from sam_hf import parse_args, run_training
run_training(*parse_args(sys.argv[1:]))
"""


def _train(argv, script=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = (
        [sys.executable, "-c", script, *argv]
        if script
        else [sys.executable, str(REPO / "scripts" / "train.py"), *argv]
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tiny_model_dir, nuclei_dir, tmp_path):
    def argv(out, workers):
        common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(nuclei_dir)]
        common += ["--output_dir", str(out), "--embedding_cache_dir", str(tmp_path / "cache")]
        return common + ARGS.format(workers=workers).split()

    _train(argv(tmp_path / "straight", 0))
    killed = _train(argv(tmp_path / "killed", 2), script=KILLER, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-4").is_dir() and not (tmp_path / "killed" / "model.safetensors").exists()
    # Resumed with another number of dataloader workers: the prompts must not depend on it.
    _train(argv(tmp_path / "killed", 1) + ["--resume_from_checkpoint", str(tmp_path / "killed" / "checkpoint-4")])

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    different = [n for n in straight if not torch.equal(straight[n], resumed[n])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    base = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(base[n], straight[n]) for n in base), "the runs did not train"


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights(tiny_model_dir, nuclei_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        _train(
            ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(nuclei_dir), "--output_dir", str(out)]
            + ["--embedding_cache_dir", str(tmp_path / "cache")]
            + ARGS.format(workers=0).replace("--max_steps 8", "--max_steps 4").split()
        )
        runs.append(load_file(out / "model.safetensors"))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.mark.slow
def test_non_finite_loss_stops_the_run(tiny_model_dir, nuclei_dir, tmp_path):
    from transformers import SamModel, SamProcessor

    from sam_hf.config.parser import parse_args
    from sam_hf.training.run import run_training

    broken = tmp_path / "broken"
    model = SamModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.mask_decoder.mask_tokens.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    SamProcessor.from_pretrained(tiny_model_dir).save_pretrained(broken)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(broken), "--dataset_name", str(nuclei_dir), "--output_dir", str(out)]
    argv += ["--embedding_cache_dir", str(tmp_path / "cache")] + ARGS.format(workers=0).split()
    with pytest.raises(FloatingPointError, match="Non-finite training loss .* at step 0"):
        run_training(*parse_args(argv))
    assert not (out / "model.safetensors").exists(), "a NaN model must not be saved"


@pytest.mark.slow
def test_non_finite_gradient_stops_the_run(tiny_model_dir, nuclei_dir, tmp_path, monkeypatch):
    """A finite loss whose backward pass overflows: the step is refused, not applied."""
    from sam_hf.config.parser import parse_args
    from sam_hf.training.loss import SamDiceCELoss
    from sam_hf.training.run import run_training

    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    forward = SamDiceCELoss.forward
    monkeypatch.setattr(
        SamDiceCELoss, "forward", lambda self, logits, labels: forward(self, InfiniteGradient.apply(logits), labels)
    )
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(nuclei_dir), "--output_dir", str(out)]
    argv += ["--embedding_cache_dir", str(tmp_path / "cache"), "--max_grad_norm", "0"] + ARGS.format(workers=0).split()
    with pytest.raises(FloatingPointError, match="Non-finite gradients at step 0"):
        run_training(*parse_args(argv))
    assert not (out / "model.safetensors").exists()

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "data" / "nuclei_demo"
# The committed pretrained tiny base, whose masks follow their prompts (a fresh random model's logits are about 1e-4).
TINY_BASE = REPO / "models" / "tiny-sam-base"


#: `scripts/train.py` flags of a short CPU run on the demo data, which each test overrides as it needs.
SHORT_RUN = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "max_train_samples": 4,
    "max_eval_samples": 2,
    "max_objects_per_image": 4,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
}


def train_argv(model_dir, dataset_dir, output_dir, **flags) -> list[str]:
    """The command line of a short training run: `SHORT_RUN` updated with `flags` (`None` drops a flag, `True` and
    `False` are spelled `true` and `false`), for `parse_args` or `scripts/train.py`."""
    values = {"model_name_or_path": model_dir, "dataset_name": dataset_dir, "output_dir": output_dir}
    values |= SHORT_RUN | flags
    argv = []
    for name, value in values.items():
        if value is not None:
            argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def launch_two_processes(model_dir, dataset_dir, out, cache_dir, train_args: str, *extra: str) -> str:
    """Run scripts/train.py under `accelerate launch` with 2 CPU processes (gloo); returns the log, asserts success."""
    import subprocess
    import sys

    launch = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"
    cmd = [
        sys.executable,
        *launch.split(),
        "--dynamo_backend",
        "no",
        str(REPO / "scripts" / "train.py"),
        *["--model_name_or_path", str(model_dir), "--dataset_name", str(dataset_dir)],
        *["--output_dir", str(out), "--embedding_cache_dir", str(cache_dir)],
        *train_args.split(),
        *extra,
    ]
    # No GPU visible: on a GPU machine two ranks would otherwise share its one device.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny SAM with its processor, saved like a Hub checkpoint."""
    from transformers import SamModel

    from sam_hf import tiny_sam_config, tiny_sam_processor

    path = tmp_path_factory.mktemp("tiny-sam")
    torch.manual_seed(0)
    config = tiny_sam_config()
    SamModel(config).save_pretrained(path)
    tiny_sam_processor(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def nuclei_dir() -> Path:
    return NUCLEI


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, nuclei_dir, tmp_path_factory):
    """A short `scripts/train.py` run on the nuclei demo data: `(output_dir, metrics)`."""
    from sam_hf.config.parser import parse_args
    from sam_hf.training.run import run_training

    out = tmp_path_factory.mktemp("run")
    argv = train_argv(
        tiny_model_dir, nuclei_dir, out, max_steps=6, learning_rate=1e-3, box_jitter=5, max_objects_per_image=8,
        eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3, load_best_model_at_end=True,
        metric_for_best_model="dice", max_train_samples=None, max_eval_samples=3, logging_steps=1, seed=1,
    )  # fmt: skip
    metrics = run_training(*parse_args(argv))
    return out, metrics


def numpy_dice_iou(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of one pair of masks, written out in numpy for tests to compare sam_hf's scores with."""
    inter = np.logical_and(pred, ref).sum()
    union = np.logical_or(pred, ref).sum()
    total = pred.sum() + ref.sum()
    return (2 * inter / total if total else 1.0), (inter / union if union else 1.0)

"""Defaults that depend on the machine: the device and the dataloader workers."""

from __future__ import annotations

import os

import torch


def default_device(device: str | torch.device | None = None) -> str:
    """The device a command runs its model on: the one asked for, else `cuda` where a GPU is present (as transformers'
    `pipeline` chooses), else `cpu`. `predict`, `evaluate`, `autolabel` and `serve` all go through here."""
    if device is not None:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dataloader_num_workers(cuda: bool | None = None) -> int:
    """Dataloader workers when none are asked for: `min(8, CPUs - 1)` with a GPU, whose steps are too short for a
    transform in the main process to keep up; 0 on CPUs, whose cores the training step itself uses."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return min(8, max((os.cpu_count() or 1) - 1, 0)) if cuda else 0


INSTALL_HINT = "pip install 'sam_hf[lora]'"

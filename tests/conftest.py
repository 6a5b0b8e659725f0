from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "data" / "nuclei_demo"


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

"""sam_hf: fine-tune Segment Anything (SAM) on your own images with transformers, datasets and accelerate.

Public names are imported on first use, so that light entry points (`sam-hf serve --help`) do not pay for importing
the Trainer stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DataArguments": "config",
    "ModelArguments": "config",
    "SamArguments": "config",
    "SamDataCollator": "data",
    "SamTransform": "data",
    "boxes_from_instances": "data",
    "jitter_boxes": "data",
    "load_source": "data",
    "mask_to_instances": "data",
    "PromptError": "inference",
    "SamPrediction": "inference",
    "SamPredictor": "inference",
    "label_image": "inference",
    "SamDiceCELoss": "loss",
    "compute_metrics": "metrics",
    "count_parameters": "modeling",
    "freeze_modules": "modeling",
    "init_sam_model": "modeling",
    "load_model_and_processor": "modeling",
    "tiny_sam_config": "modeling",
    "tiny_sam_processor": "modeling",
    "parse_args": "run",
    "run_training": "run",
    "SamTrainer": "trainer",
}

__all__ = [
    "DataArguments",
    "ModelArguments",
    "PromptError",
    "SamArguments",
    "SamDataCollator",
    "SamDiceCELoss",
    "SamPrediction",
    "SamPredictor",
    "SamTrainer",
    "SamTransform",
    "boxes_from_instances",
    "compute_metrics",
    "count_parameters",
    "freeze_modules",
    "init_sam_model",
    "jitter_boxes",
    "label_image",
    "load_model_and_processor",
    "load_source",
    "mask_to_instances",
    "parse_args",
    "run_training",
    "tiny_sam_config",
    "tiny_sam_processor",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sam_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from .config import DataArguments, ModelArguments, SamArguments
    from .data import SamDataCollator, SamTransform, boxes_from_instances, jitter_boxes, load_source, mask_to_instances
    from .inference import PromptError, SamPrediction, SamPredictor, label_image
    from .loss import SamDiceCELoss
    from .metrics import compute_metrics
    from .modeling import (
        count_parameters,
        freeze_modules,
        init_sam_model,
        load_model_and_processor,
        tiny_sam_config,
        tiny_sam_processor,
    )
    from .run import parse_args, run_training
    from .trainer import SamTrainer

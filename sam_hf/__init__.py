"""sam_hf: fine-tune Segment Anything (SAM) on your own images with transformers, datasets and accelerate.

Public names are imported on first use, so that light entry points (`sam-hf serve --help`) do not pay for importing
the Trainer stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DataArguments": "config.arguments",
    "ModelArguments": "config.arguments",
    "SamArguments": "config.arguments",
    "SamDataCollator": "data.collator",
    "SamTransform": "data.transforms",
    "boxes_from_instances": "core.masks",
    "jitter_boxes": "data.transforms",
    "load_source": "data.sources",
    "mask_to_instances": "core.masks",
    "PromptError": "core.prompts",
    "SamPrediction": "inference.predictor",
    "SamPredictor": "inference.predictor",
    "label_image": "core.masks",
    "SamDiceCELoss": "training.loss",
    "compute_metrics": "training.metrics",
    "count_parameters": "family.modeling",
    "freeze_modules": "family.modeling",
    "init_sam_model": "family.modeling",
    "load_model_and_processor": "family.modeling",
    "tiny_sam_config": "family.tiny",
    "tiny_sam_processor": "family.tiny",
    "parse_args": "config.parser",
    "run_training": "training.run",
    "SamTrainer": "training.trainer",
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
    from .config.arguments import DataArguments, ModelArguments, SamArguments
    from .config.parser import parse_args
    from .core.masks import boxes_from_instances, label_image, mask_to_instances
    from .core.prompts import PromptError
    from .data.collator import SamDataCollator
    from .data.sources import load_source
    from .data.transforms import SamTransform, jitter_boxes
    from .family.modeling import count_parameters, freeze_modules, init_sam_model, load_model_and_processor
    from .family.tiny import tiny_sam_config, tiny_sam_processor
    from .inference.predictor import SamPrediction, SamPredictor
    from .training.loss import SamDiceCELoss
    from .training.metrics import compute_metrics
    from .training.run import run_training
    from .training.trainer import SamTrainer

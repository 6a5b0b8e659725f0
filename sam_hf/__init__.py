"""sam_hf: fine-tune Segment Anything (SAM) on your own images with transformers, datasets and accelerate."""

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

__version__ = "0.1.0"

__all__ = [
    "DataArguments",
    "ModelArguments",
    "SamArguments",
    "SamDataCollator",
    "PromptError",
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

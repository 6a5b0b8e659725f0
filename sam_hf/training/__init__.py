"""Training: the loss, the Trainer subclass and its callbacks, the run from arguments to pushed checkpoint, and the
end-of-run report."""

from __future__ import annotations

from .loss import SamDiceCELoss, actual_iou, iou_prediction_loss, multimask_loss
from .metrics import compute_metrics
from .objective import SamObjective
from .output_dir import check_output_dir
from .report import box_baseline_dice, evaluate_command, loss_description, training_summary, write_figures
from .run import check_arguments, run_training
from .trainer import SamTrainer

__all__ = [
    "SamDiceCELoss",
    "SamObjective",
    "SamTrainer",
    "actual_iou",
    "box_baseline_dice",
    "check_arguments",
    "check_output_dir",
    "compute_metrics",
    "evaluate_command",
    "iou_prediction_loss",
    "loss_description",
    "multimask_loss",
    "run_training",
    "training_summary",
    "write_figures",
]

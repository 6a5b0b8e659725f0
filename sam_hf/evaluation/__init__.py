"""Evaluation: box prompts, interactive corrections and automatic masks, scored per object, and the report."""

from __future__ import annotations

from .arguments import EvaluateArguments, parse_model_specs
from .automatic import evaluate_automatic
from .boxes import evaluate_models, load_object_metrics
from .interactive import interactive_curve
from .report import summarize, to_markdown
from .run import run_evaluation

__all__ = [
    "EvaluateArguments",
    "evaluate_automatic",
    "evaluate_models",
    "interactive_curve",
    "load_object_metrics",
    "parse_model_specs",
    "run_evaluation",
    "summarize",
    "to_markdown",
]

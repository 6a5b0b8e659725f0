"""The argument dataclasses and the parser that fills them from the command line or one config file."""

from __future__ import annotations

from .arguments import PROMPT_TYPES, DataArguments, ModelArguments, SamArguments, multimask_stride, parse_prompt_types
from .parser import config_to_argv, default_output_dir, parse_args

__all__ = [
    "DataArguments",
    "ModelArguments",
    "PROMPT_TYPES",
    "SamArguments",
    "config_to_argv",
    "default_output_dir",
    "multimask_stride",
    "parse_args",
    "parse_prompt_types",
]

"""Parsing the command line or one config file into the argument dataclasses."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..core.env import default_dataloader_num_workers
from .arguments import DataArguments, ModelArguments, SamArguments, multimask_stride

logger = logging.getLogger(__name__)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, SamArguments, TrainingArguments)


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, SamArguments, TrainingArguments]:
    """Parse the command line, or a `.yaml` / `.json` config path given first, optionally followed by flags that
    override it (`train.py configs/demo.yaml --output_dir runs/other --max_steps 100`)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        path = os.path.abspath(argv[0])
        if len(argv) == 1:
            load = parser.parse_json_file if path.endswith(".json") else parser.parse_yaml_file
            parsed = load(path)
            with open(path) as f:
                given = set(json.load(f) if path.endswith(".json") else yaml.safe_load(f))
            return _with_defaults(*parsed, given)
        argv = config_to_argv(path) + list(argv[1:])
    parsed = parser.parse_args_into_dataclasses(args=argv)
    return _with_defaults(*parsed, _given_names(argv))


def _flag_names() -> set[str]:
    """Every long flag `HfArgumentParser` makes of `ARGUMENT_CLASSES`: one per field, and `no_<field>` for the
    booleans that default to true."""
    fields = [f for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init]
    return {f.name for f in fields} | {f"no_{f.name}" for f in fields if f.default is True}


def _given_names(argv: list[str]) -> set[str]:
    """The argument names present in `argv`; argparse also accepts --output-dir, --output_dir=x and unique prefixes."""
    known = _flag_names()
    given = set()
    for arg in argv:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        matches = {flag} if flag in known else {k for k in known if k.startswith(flag)}
        if len(matches) == 1:
            given |= matches
    return given


def default_output_dir(model_name_or_path: str, dataset_name: str) -> str:
    """`runs/<model>-<dataset>`: the last path component of each, e.g. `runs/sam-vit-base-nuclei` for
    `facebook/sam-vit-base` on `someone/nuclei`, or `runs/tiny-sam-base-nuclei_demo` for local folders."""
    return os.path.join("runs", f"{Path(model_name_or_path).name}-{Path(dataset_name).name}")


def _with_defaults(model_args, data_args, sam_args, training_args, given: set[str]):
    if data_args.point_crop_scale and not multimask_stride(sam_args):
        raise ValueError(
            "--point_crop_scale cuts crops for the multimask point pass, which --multimask_every 0 turns off: pass "
            "--point_crop_scale 0 as well, or keep the point pass."
        )
    # TrainingArguments replaces a missing --output_dir by ./trainer_output, shared by every run; name it instead.
    if "output_dir" not in given:
        training_args.output_dir = default_output_dir(model_args.model_name_or_path, data_args.dataset_name)
    if "dataloader_num_workers" not in given and not training_args.use_cpu:
        workers = default_dataloader_num_workers()
        if workers:
            training_args.dataloader_num_workers = workers
            logger.info("--dataloader_num_workers %d (the default on a GPU machine; pass it to choose).", workers)
    if "dataloader_persistent_workers" not in given and training_args.dataloader_num_workers > 0:
        # Restarting the workers costs every epoch a stall; the prompt epoch reaches persistent workers (shared).
        training_args.dataloader_persistent_workers = True
    return model_args, data_args, sam_args, training_args


def config_to_argv(path: str) -> list[str]:
    """A `.yaml` / `.json` config as command-line flags, so that flags given after it override its values."""
    with open(path) as f:
        config = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"Config {path} must hold a mapping of argument names to values.")
    argv: list[str] = []
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv

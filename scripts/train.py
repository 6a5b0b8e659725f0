#!/usr/bin/env python
"""Fine-tune SAM's mask decoder with box prompts derived from ground-truth masks.

    python scripts/train.py configs/demo.yaml
    accelerate launch scripts/train.py --model_name_or_path facebook/sam-vit-base --dataset_name <dataset> \
        --output_dir runs/sam-tuned ...

Every flag of `sam_hf.config` and of `transformers.TrainingArguments` is accepted.
"""

import sys
from pathlib import Path

# scripts/evaluate.py shares its name with the `evaluate` library; keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

from sam_hf.config.parser import parse_args
from sam_hf.training.run import run_training


def main() -> None:
    run_training(*parse_args())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every process waits for the main one (it writes figures and the card last), then all leave together:
        # a process that exits while the others still use the process group can abort at interpreter shutdown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

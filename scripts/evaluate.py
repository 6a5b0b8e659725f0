"""Evaluate SAM checkpoints side by side with box prompts (per-object Dice / IoU at the original resolution).

    python scripts/evaluate.py --model base=models/tiny-sam-base tuned=runs/demo \
        --dataset_name data/nuclei_demo --validation_split_percentage 25 --output_dir runs/demo-eval

Takes the data flags of train.py; with the same --seed and --validation_split_percentage it scores the same held-out
images. Writes metrics.json, metrics.md, per_object.jsonl and base_vs_tuned.png to --output_dir.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# This file is named like the `evaluate` library; keep its folder off the import path so `import evaluate` finds the
# library.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from transformers import HfArgumentParser

from sam_hf.config.arguments import DataArguments
from sam_hf.evaluation.arguments import EvaluateArguments
from sam_hf.evaluation.report import to_markdown
from sam_hf.evaluation.run import run_evaluation

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    parser = HfArgumentParser((EvaluateArguments, DataArguments))
    argv = sys.argv[1:]
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        load = parser.parse_yaml_file if argv[0].endswith((".yaml", ".yml")) else parser.parse_json_file
        eval_args, data_args = load(argv[0])
    else:
        eval_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    print(to_markdown(run_evaluation(eval_args, data_args)))

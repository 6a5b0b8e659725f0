"""Segment images with box and/or point prompts using a (fine-tuned) SAM checkpoint.

    .venv/bin/python scripts/predict.py --model runs/demo \
        --images data/nuclei_demo/images/fe80a2cf3c93dafad8c364fdd1646b0ba4db056cdb7bdb81474f957064812bba.png \
        --boxes "237,38,285,80;11,60,53,101;148,279,187,326" --output_dir runs/predictions
    .venv/bin/python scripts/predict.py --model runs/demo --images my_folder --prompts prompts.json --multimask_output

Writes per image: <stem>/mask_NNN.png, <stem>_labels.png (uint16, for programs), <stem>_labels_color.png (for
viewing), <stem>_overlay.png (masks, prompts and scores) and <stem>.json (scores, areas). A prompt whose mask comes
back empty is logged as a warning naming the image and the prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path

# scripts/evaluate.py shares its name with the `evaluate` library; keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import json
import logging

from transformers import HfArgumentParser

from sam_hf.apps.predict import PredictArguments, run_prediction

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(PredictArguments).parse_args_into_dataclasses(args=sys.argv[1:])
    report = run_prediction(args)
    print(
        json.dumps({name: {"best_score": e["best_score"], "mask_area": e["mask_area"]} for name, e in report.items()})
    )

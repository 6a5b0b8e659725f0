"""Segment images with box and/or point prompts using a (fine-tuned) SAM checkpoint.

    python scripts/predict.py --model runs/demo --images data/nuclei_demo/images/<stem>.png \
        --boxes "10,12,40,44;60,8,90,30" --output_dir predictions
    python scripts/predict.py --model runs/demo --images my_folder --prompts prompts.json --multimask_output

Writes per image: <stem>/mask_NNN.png, <stem>_labels.png, <stem>_overlay.png and <stem>.json (scores, areas).
"""

from __future__ import annotations

import json
import logging
import sys

from transformers import HfArgumentParser

from sam_hf.predict import PredictArguments, run_prediction

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(PredictArguments).parse_args_into_dataclasses(args=sys.argv[1:])
    report = run_prediction(args)
    print(
        json.dumps({name: {"best_score": e["best_score"], "mask_area": e["mask_area"]} for name, e in report.items()})
    )

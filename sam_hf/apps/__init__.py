"""Applications on top of the library: `scripts/predict.py`, `sam-hf autolabel`, `sam-hf serve` and the `sam-hf`
command line. Each is imported on use, so that `sam-hf --help` stays light."""

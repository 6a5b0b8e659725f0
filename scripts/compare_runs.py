#!/usr/bin/env python
"""Compare training runs: eval loss and an eval metric against step on one figure, and a table of best values.

    python scripts/compare_runs.py runs/a runs/b --output comparison.png [--metric eval_dice] [--labels a b]

Each run is an output directory of `scripts/train.py` (its `trainer_state.json`, or that of its latest checkpoint).
The markdown table (run, best value, step of best, final value) is printed and written next to the figure, as
`comparison.md` for `--output comparison.png`, unless `--table` names another file. For Dice and IoU higher is
better, for losses lower.
"""

from __future__ import annotations

import sys
from pathlib import Path

# scripts/evaluate.py shares its name with the `evaluate` library; keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="Output directories (or trainer_state.json files) of the runs.")
    parser.add_argument("--output", default="comparison.png", help="Figure path; the suffix sets the format.")
    parser.add_argument(
        "--metric", default="eval_dice", help="Eval metric of the second panel and the table (eval_dice, eval_iou...)."
    )
    parser.add_argument("--labels", nargs="+", help="One name per run; defaults to the directory names.")
    parser.add_argument("--table", help="Where to write the markdown table; defaults to the figure path with .md.")
    parser.add_argument("--dpi", type=float, default=150, help="Resolution of the figure.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from sam_hf.viz import compare_runs, runs_table_markdown, save_figure

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise SystemExit(f"--labels needs one name per run: got {len(args.labels)} for {len(args.runs)} runs.")
    fig, rows = compare_runs(args.runs, metric=args.metric, labels=args.labels)
    output = save_figure(fig, args.output, dpi=args.dpi)
    table = runs_table_markdown(rows)
    table_path = Path(args.table) if args.table else output.with_suffix(".md")
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table)
    print(table, end="")
    print(f"\nWrote {output} and {table_path}")


if __name__ == "__main__":
    main()

"""Reading runs: the trainer state of a run or checkpoint, its logged series, and the summary of several runs side by
side. No matplotlib: `plots` draws from these."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _state_path(run: str | os.PathLike) -> Path:
    path = Path(run)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "trainer_state.json").is_file():
            return path / "trainer_state.json"
        checkpoints = sorted(
            (p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").is_file()), key=_checkpoint_step
        )
        if checkpoints:
            return checkpoints[-1] / "trainer_state.json"
        raise FileNotFoundError(f"{path} has no trainer_state.json, neither at its top nor in a checkpoint-* folder.")
    raise FileNotFoundError(f"{path} is neither a run output directory nor a trainer_state.json file.")


def load_trainer_state(trainer_state: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a `transformers.Trainer` state: `trainer_state.json` of a run, with its `log_history`.

    Args:
        trainer_state: an output directory (its `trainer_state.json`, or that of its latest `checkpoint-*` if the
            run stopped early), the path of a `trainer_state.json`, or an already loaded dict.

    Returns:
        The state as a dict. When read from a directory or file, `_base_eval` holds the base model's metrics from a
        `base_eval_results.json` beside it, if there is one (sam_hf's evaluation before training).
    """
    if isinstance(trainer_state, Mapping):
        state = dict(trainer_state)
    else:
        path = _state_path(trainer_state)
        state = json.loads(path.read_text())
        base = path.parent / "base_eval_results.json"
        if base.is_file():
            state["_base_eval"] = json.loads(base.read_text())
    if not isinstance(state.get("log_history"), list):
        raise ValueError("Not a trainer state: no `log_history` list.")
    return state


def _series(state: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [
        (entry["step"], entry[key])
        for entry in state["log_history"]
        if key in entry and "step" in entry and entry[key] is not None and math.isfinite(entry[key])
    ]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def _eval_key(metric: str) -> str:
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def has_loss_curves(trainer_state: str | os.PathLike | Mapping[str, Any]) -> bool:
    """Whether a run's trainer state logs anything `plot_loss_curves` draws (train or eval loss, eval Dice or IoU).

    A short run with `max_steps` below `logging_steps` and no evaluation logs none of them.
    """
    state = load_trainer_state(trainer_state)
    return any(len(_series(state, key)[0]) for key in ("loss", "eval_loss", "eval_dice", "eval_iou"))


def metric_summary(
    trainer_state: str | os.PathLike | Mapping[str, Any],
    metric: str = "eval_dice",
    greater_is_better: bool | None = None,
) -> dict[str, Any]:
    """Best value of an eval metric over a run, the step it came at, and the final value.

    Args:
        trainer_state: an output directory, a `trainer_state.json` path, or a loaded state dict.
        metric (`str`, *optional*, defaults to `"eval_dice"`): a key of the eval entries of `log_history`; the
            `eval_` prefix may be left out (`"dice"`).
        greater_is_better (`bool`, *optional*): defaults to `False` for metrics whose name contains `loss` and
            `True` otherwise (Dice, IoU).

    Returns:
        `{"metric", "best", "best_step", "final", "final_step", "num_evals"}`; the values are `None` when the run
        never logged the metric. Ties go to the earliest step.
    """
    state = load_trainer_state(trainer_state)
    key = _eval_key(metric)
    if greater_is_better is None:
        greater_is_better = "loss" not in key
    steps, values = _series(state, key)
    summary: dict[str, Any] = {"metric": key, "best": None, "best_step": None, "final": None, "final_step": None}
    summary["num_evals"] = len(values)
    if len(values):
        best = int(np.argmax(values) if greater_is_better else np.argmin(values))
        summary.update(
            best=float(values[best]), best_step=int(steps[best]), final=float(values[-1]), final_step=int(steps[-1])
        )
    return summary


def _run_labels(run_dirs: Sequence[str | os.PathLike], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise ValueError(f"Got {len(labels)} labels for {len(run_dirs)} runs.")
        return [str(label) for label in labels]
    names = [Path(run).resolve().name for run in run_dirs]
    if len(set(names)) < len(names):
        return [str(run) for run in run_dirs]
    return names


def runs_table_markdown(rows: Sequence[Mapping[str, Any]], metric: str | None = None) -> str:
    """Render the rows of `compare_runs` as a markdown table, the best run's value in bold.

    Args:
        rows: dicts with `run`, `best`, `best_step` and `final` (and `metric`, used when `metric` is not given).
        metric (`str`, *optional*): the metric's name in the header.

    Returns:
        The table, one line per run, ending with a newline.
    """
    metric = metric or (rows[0].get("metric") if rows else None) or "metric"
    greater = "loss" not in metric
    valid = [row["best"] for row in rows if row.get("best") is not None]
    winner = (max(valid) if greater else min(valid)) if valid else None

    def fmt(value: Any) -> str:
        return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    lines = [f"| run | best {metric} | step of best | final {metric} |", "|---|---|---|---|"]
    for row in rows:
        best = fmt(row.get("best"))
        if row.get("best") is not None and row["best"] == winner:
            best = f"**{best}**"
        lines.append(f"| {row['run']} | {best} | {fmt(row.get('best_step'))} | {fmt(row.get('final'))} |")
    return "\n".join(lines) + "\n"

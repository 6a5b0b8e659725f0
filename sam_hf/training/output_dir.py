"""The output-dir policy: what a new run may overwrite and when it must resume."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..hub.card import FIGURES

logger = logging.getLogger(__name__)


# What a previous run left in its output dir that would otherwise mix into a new one there: checkpoints (rotated by
# step number, so an old run's later checkpoint would outlive the new run's), metrics (all_results.json is merged,
# not replaced), the log history and the figures (the card embeds those it finds). --overwrite_output_dir removes them;
# the model, processor and card files are overwritten by the new run.
PREVIOUS_RUN_FILES = (
    re.compile(r"^\S*_results\.json$"),
    re.compile(r"^trainer_state\.json$"),
    re.compile(r"^adapter$"),  # a --lora_rank run's adapter folder
)


_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$")


def check_output_dir(
    training_args: TrainingArguments, overwrite_output_dir: bool = False, remove_previous_run: bool | None = None
) -> None:
    """Refuse to train into an output dir that already holds files, unless resuming or overwriting.

    A new run in a used directory would delete the previous run's checkpoints by rotation and overwrite its model,
    card and metrics. An empty or missing directory is fine; so are hidden entries (`.gitignore`, `.DS_Store`). With
    `--resume_from_checkpoint` the directory is the run being continued. With `--overwrite_output_dir` the previous
    run's checkpoints, `*_results.json`, `trainer_state.json` and figures are deleted (by the process that saves,
    `training_args.should_save`, unless `remove_previous_run` says otherwise) so they cannot mix into the new run.

    Every process may call this: nothing is written to the output dir before the first barrier of `run_training`, so
    all processes see the same directory.
    """
    out = Path(training_args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file, not a directory.")
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    resuming = bool(training_args.resume_from_checkpoint)
    if resuming and overwrite_output_dir:
        raise ValueError(
            "--resume_from_checkpoint continues the run in --output_dir and --overwrite_output_dir would delete it; "
            "pass only one of them."
        )
    if not entries or resuming:
        return
    checkpoints = sorted((e for e in entries if _CHECKPOINT.match(e)), key=lambda e: int(e.rsplit("-", 1)[1]))
    if not overwrite_output_dir:
        others = [e for e in entries if e not in checkpoints]
        held = ([f"{len(checkpoints)} checkpoint(s) ({', '.join(checkpoints)})"] if checkpoints else []) + others[:8]
        held += [f"and {len(others) - 8} more"] if len(others) > 8 else []
        last = get_last_checkpoint(str(out))
        resume = f"--resume_from_checkpoint {last}" if last else "--resume_from_checkpoint <checkpoint dir>"
        raise ValueError(
            f"--output_dir {out} already holds a previous run: {', '.join(held)}. Training into it would delete its "
            f"checkpoints by rotation and overwrite its model, card and metrics. Pass {resume} to continue that "
            f"run, --overwrite_output_dir to replace it, or another --output_dir."
        )
    if not (training_args.should_save if remove_previous_run is None else remove_previous_run):
        return
    stale = checkpoints + [
        e for e in entries if any(p.match(e) for p in PREVIOUS_RUN_FILES) or e in {name for name, _ in FIGURES}
    ]
    for name in stale:
        path = out / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    logger.warning(
        "--overwrite_output_dir: replacing the previous run in %s%s.",
        out,
        f" (deleted {', '.join(stale)})" if stale else "",
    )

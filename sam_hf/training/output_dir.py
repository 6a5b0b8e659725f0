"""The output-dir policy: what a new run may overwrite and when it must resume."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers import TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

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


# What a writer says when the disk or the quota is full, for those that keep no errno (safetensors' SafetensorError
# carries the Rust error's text; torch.save's RuntimeError does not say why).
_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded|StorageFull|QuotaExceeded|FilesystemQuota")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the checkpoint folder `path` can be resumed from: it holds a readable `trainer_state.json`.

    Trainer writes that file last, after the weights, the optimizer, the scheduler and the RNG states, so a save that
    failed or was killed part-way leaves a folder without it (or with a truncated one).
    """
    try:
        json.loads((Path(path) / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints_of(output_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The `checkpoint-N` folders of `output_dir` by step: `(complete, incomplete)` (see `is_complete_checkpoint`)."""
    out = Path(output_dir)
    names = [p.name for p in out.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if out.is_dir() else []
    names.sort(key=lambda e: int(e.rsplit("-", 1)[1]))
    complete = [n for n in names if is_complete_checkpoint(out / n)]
    return complete, [n for n in names if n not in complete]


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, says that the disk or the quota is full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _DISK_FULL.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 1e9:.2f} GB free"
    except OSError:
        return "free space unknown"


def disk_full_error(
    what: str, directory: str | os.PathLike, output_dir: str | os.PathLike, removed: bool = False
) -> OSError:
    """The error to raise when saving `what` to `directory` found the disk full: where (`removed`: that folder was
    removed again), how much space is left, and the complete checkpoint of `output_dir` to resume from."""
    directory = Path(directory)
    where = f"{directory}, removed again as incomplete" if removed else str(directory)
    complete, _ = checkpoints_of(output_dir)
    then = (
        f"then run the same command with --resume_from_checkpoint {Path(output_dir) / complete[-1]}"
        if complete
        else "then run the same command again (no complete checkpoint to resume from)"
    )
    return OSError(
        errno.ENOSPC,
        f"No space left on device while saving {what} to {where} ({_free_space(directory)} there). Free some "
        f"space, keep fewer checkpoints (--save_total_limit) or write to another --output_dir; {then}.",
    )


def failed_checkpoint(checkpoint: str | os.PathLike, err: BaseException, remove: bool = True) -> OSError | None:
    """After saving the folder `checkpoint` failed with `err`: remove it unless it is complete (`remove`: this is the
    process that saves), so that nothing recommends resuming from it; return the error to raise instead of `err` for
    a full disk (`disk_full_error`), `None` otherwise."""
    checkpoint = Path(checkpoint)
    removed = remove and checkpoint.is_dir() and not is_complete_checkpoint(checkpoint)
    if removed:
        shutil.rmtree(checkpoint, ignore_errors=True)
        logger.warning(
            "Removed the incomplete checkpoint %s: saving it failed (%s: %s).", checkpoint, type(err).__name__, err
        )
    if not is_disk_full(err):
        return None
    return disk_full_error("a checkpoint", checkpoint, checkpoint.parent, removed=removed)


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
    if resuming:
        _check_resumable(Path(training_args.resume_from_checkpoint))
    if not entries or resuming:
        return
    checkpoints = sorted((e for e in entries if _CHECKPOINT.match(e)), key=lambda e: int(e.rsplit("-", 1)[1]))
    if not overwrite_output_dir:
        others = [e for e in entries if e not in checkpoints]
        held = ([f"{len(checkpoints)} checkpoint(s) ({', '.join(checkpoints)})"] if checkpoints else []) + others[:8]
        held += [f"and {len(others) - 8} more"] if len(others) > 8 else []
        complete, incomplete = checkpoints_of(out)
        if incomplete:
            held.append(f"the incomplete {', '.join(incomplete)} (a save that did not finish: not resumable)")
        resume = f"--resume_from_checkpoint {out / complete[-1]} to continue that run, " if complete else ""
        raise ValueError(
            f"--output_dir {out} already holds a previous run: {', '.join(held)}. Training into it would delete its "
            f"checkpoints by rotation and overwrite its model, card and metrics. Pass {resume}--overwrite_output_dir "
            "to replace it, or another --output_dir."
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


def _check_resumable(checkpoint: Path) -> None:
    """Refuse `--resume_from_checkpoint` of a `checkpoint-N` folder whose save did not finish, naming the last complete
    one of its run (Trainer would fail later with "Can't find a valid checkpoint")."""
    if not (checkpoint.is_dir() and _CHECKPOINT.match(checkpoint.name)) or is_complete_checkpoint(checkpoint):
        return
    complete, _ = checkpoints_of(checkpoint.parent)
    instead = (
        f"resume from the last complete one, --resume_from_checkpoint {checkpoint.parent / complete[-1]}"
        if complete
        else "no checkpoint of that run is complete: start it again with --overwrite_output_dir"
    )
    raise ValueError(
        f"--resume_from_checkpoint {checkpoint} is incomplete: its save did not finish (no readable "
        f"{TRAINER_STATE_NAME}); {instead}."
    )

"""The training job behind `scripts/train.py`, callable in-process."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import sys
import zlib
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
import yaml
from transformers import EarlyStoppingCallback, HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .cache import EmbeddingCacheError, add_image_embeddings, quarantine, verify_embedding_cache
from .config import DataArguments, ModelArguments, SamArguments
from .data import SamDataCollator, SamTransform, load_source, prepare_split, split_source
from .family import family_of
from .hub import FIGURES, check_hub_access
from .interactive import parse_prompt_types
from .lora import add_lora_adapters, lora_card_info
from .loss import SamDiceCELoss
from .metrics import compute_metrics
from .modeling import count_parameters, freeze_modules, freeze_unused_decoder_outputs, load_model_and_processor
from .trainer import PromptEpochCallback, SamTrainer

logger = logging.getLogger(__name__)
# The end-of-run summary has its own logger, so that it shows at transformers' default (warning) verbosity.
SUMMARY_LOGGER = logging.getLogger(f"{__name__}.summary")

__all__ = [
    "box_baseline_dice",
    "check_arguments",
    "check_output_dir",
    "config_to_argv",
    "default_dataloader_num_workers",
    "default_output_dir",
    "evaluate_command",
    "loss_description",
    "multimask_stride",
    "parse_args",
    "run_training",
    "training_summary",
    "write_figures",
]

ARGUMENT_CLASSES = (ModelArguments, DataArguments, SamArguments, TrainingArguments)

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
    return _with_defaults(*parsed, _given_names(parser, argv))


def _given_names(parser: HfArgumentParser, argv: list[str]) -> set[str]:
    """The argument names present in `argv`; argparse also accepts --output-dir, --output_dir=x and unique prefixes."""
    known = {o.lstrip("-").replace("-", "_") for a in parser._actions for o in a.option_strings if o.startswith("--")}
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


def default_dataloader_num_workers(cuda: bool | None = None) -> int:
    """Dataloader workers when none are asked for: `min(8, CPUs - 1)` with a GPU, whose steps are too short for a
    transform in the main process to keep up; 0 on CPUs, whose cores the training step itself uses."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return min(8, max((os.cpu_count() or 1) - 1, 0)) if cuda else 0


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


def box_baseline_dice(dataset: datasets.Dataset) -> float:
    """Mean per-object Dice of predicting each object's exact box, filled: the score a model must beat.

    Reads the `boxes` and `areas` columns of `index_objects`; an object lies inside its box, so the intersection is
    its area and Dice is `2 * area / (area + box_area)`.
    """
    boxes = np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in dataset["boxes"]])
    areas = np.concatenate([np.asarray(a, np.float64) for a in dataset["areas"]])
    box_areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return float(np.mean(2 * areas / (areas + box_areas)))


def prompt_recipe(data_args: DataArguments, sam_args: SamArguments) -> str:
    """How the model was prompted and what it saw, in words, for the model card."""
    jitter = sam_args.box_jitter
    boxes = f"jittered outward by up to {jitter:g} px per side" if jitter else "exact"
    text = (
        f"one box per object from the ground-truth masks (mask_type={data_args.mask_type}); training boxes {boxes}, "
        f"at most {sam_args.max_objects_per_image} objects per image per step; evaluation boxes exact."
    )
    if data_args.object_crop_scale:
        text += (
            f" Each object was seen on its own square crop, {data_args.object_crop_scale:g} times the longer side of "
            f"its box: predict the same way (`scripts/predict.py --object_crop_scale {data_args.object_crop_scale:g}`,"
            " `sam_hf.tiling.ObjectCropPredictor`)."
        )
        if data_args.point_crop_scale:
            text += (
                f" One object in {data_args.point_crop_every} was also cut on a crop of "
                f"{data_args.point_crop_scale:g} times its box, for the point prompts only."
            )
    elif data_args.tile_size:
        text += f" Images were cut into {data_args.tile_size}-px tiles (overlap {data_args.tile_overlap} px)."
    return text + interactive_recipe(sam_args)


def loss_description(sam_args: SamArguments) -> str:
    """What the training loss is, in words, for the model card."""
    text = (
        f"MONAI DiceCELoss(sigmoid=True), lambda_dice={sam_args.lambda_dice}, lambda_ce={sam_args.lambda_ce}, on the "
        "low-resolution mask logits of the box prompts with multimask_output=False"
    )
    if sam_args.iou_loss_weight > 0:
        text += (
            f", plus an IoU-prediction MSE (weight {sam_args.iou_loss_weight:g}) between the IoU head's score for "
            "that mask and its actual IoU with the target"
        )
    every = multimask_stride(sam_args)
    if every:
        which = "per object" if every == 1 else f"for every {every}th object of each image (in turn)"
        text += (
            f"; plus, {which}, prompted with one random interior point and multimask_output=True, the best-of-3 "
            f"DiceCE and an IoU-prediction MSE (weight {sam_args.iou_loss_weight:g}) over the three candidates"
            + ("" if every == 1 else ", summed over those objects and divided by the number of box-prompted objects")
        )
        if sam_args.background_point_weight:
            text += (
                f"; plus (weight {sam_args.background_point_weight:g}) one point per image on no object, its three "
                "masks against an empty target (cross-entropy) and their predicted IoUs against 0"
            )
    return text + "."


def interactive_recipe(sam_args: SamArguments) -> str:
    """The model card's words for `--prompt_types` and `--num_correction_rounds` (empty for the default)."""
    types = parse_prompt_types(sam_args.prompt_types)
    text = ""
    if types != ("box",):
        text += f" First prompts taken in turn per step: {', '.join(types)} (points drawn inside each object)."
    if sam_args.num_correction_rounds:
        text += (
            f" Interactive training: {sam_args.num_correction_rounds} correction round(s), each adding one click "
            "from the larger error region and the previous logits as mask prompt; losses summed over rounds."
        )
    return text


def multimask_stride(sam_args: SamArguments) -> int:
    """Every how many objects the multimask point pass prompts: 1 with `--multimask_training`, else
    `--multimask_every` (0: no point pass)."""
    return 1 if sam_args.multimask_training else sam_args.multimask_every


def write_figures(
    trainer: SamTrainer, processor, eval_images: datasets.Dataset | None, mask_type: str = "auto"
) -> list[Path]:
    """Write `loss_curves.png` and `eval_predictions.png` (tuned model against ground truth on up to 4 eval images)
    to the output dir; skipped with a warning when matplotlib (`sam_hf[viz]`) is missing."""
    try:
        from .viz import has_loss_curves, plot_base_vs_tuned, plot_loss_curves, save_figure
    except ImportError as err:
        logger.warning("No figures written: %s (install sam_hf[viz]).", err)
        return []
    from .evaluation import evaluate_models
    from .inference import SamPredictor

    out = Path(trainer.args.output_dir)
    written = []
    if has_loss_curves(out):
        written.append(save_figure(plot_loss_curves(out), out / "loss_curves.png"))
    else:
        logger.info(
            "loss_curves.png not written: the run logged no loss and no evaluation (max_steps %s, logging_steps %s).",
            trainer.args.max_steps,
            trainer.args.logging_steps,
        )
    if eval_images is not None and len(eval_images):
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        predictor = SamPredictor(model, processor)
        result = evaluate_models(
            {"tuned": predictor},
            eval_images,
            mask_type,
            num_figure_images=len(eval_images),
            # The frozen encoder's cached output, when there is one: no image is encoded again.
            use_cached_embeddings="image_embeddings" in eval_images.column_names,
        )
        written.append(save_figure(plot_base_vs_tuned(result["figure_samples"]), out / "eval_predictions.png"))
        model.train(was_training)
    if written:
        logger.info("Wrote %s", ", ".join(p.name for p in written))
    return written


# DataArguments that do not change which images are evaluated, left out of the suggested evaluate.py command.
_NOT_FOR_EVALUATION = {"max_train_samples", "preprocessing_num_workers", "point_crop_scale", "point_crop_every"}


def evaluate_command(model_name_or_path: str, output_dir: str, data_args: DataArguments, seed: int) -> str:
    """The `scripts/evaluate.py` command that scores the base and the tuned model on the run's held-out images: the
    run's data flags that differ from their defaults, and `--seed` if it is not 42."""
    python = os.path.relpath(sys.executable) if sys.executable else "python"
    if python.startswith(".."):
        python = "python"
    argv = [python, "scripts/evaluate.py", "--model", f"base={model_name_or_path}", f"tuned={output_dir}"]
    for f in fields(DataArguments):
        value = getattr(data_args, f.name)
        if f.name in _NOT_FOR_EVALUATION or value is None or value == f.default:
            continue
        argv += [f"--{f.name}", f"{value:g}" if isinstance(value, float) else str(value)]
    if seed != 42:
        argv += ["--seed", str(seed)]
    argv += ["--output_dir", f"{os.path.normpath(output_dir)}-eval"]
    return shlex.join(argv)


def training_summary(
    metrics: dict[str, float],
    output_dir: str,
    figures: list[Path] | tuple[Path, ...] = (),
    best_step: int | None = None,
    eval_images: int | None = None,
    next_command: str | None = None,
    hub_model_id: str | None = None,
    eval_unit: str = "images",
) -> str:
    """The few lines a run ends with: held-out Dice and IoU before -> after, the filled-box baseline, where the
    model, card and figures are, and the next command to run. `eval_unit` names what the `eval_images` rows are
    (`DataArguments.eval_unit`: images, tiles or object crops)."""
    lines = ["Training finished."]
    after = {k: metrics.get(f"eval_{k}") for k in ("dice", "iou")}
    if after["dice"] is not None:
        objects = metrics.get("eval_num_objects", metrics.get("base_eval_num_objects"))
        count = "" if eval_images is None else f"{eval_images} "
        if eval_unit == "object crops":
            where = f" on the {count}held-out objects, each on its own crop"
        else:
            where = f" on the {count}held-out {eval_unit}"
            where += f" ({objects:g} objects)" if objects is not None else ""
        best = f" (best checkpoint, step {best_step})" if best_step is not None else ""
        lines.append(f"Per-object scores{where}, exact box prompts{best}:")
        for key, name in (("dice", "Dice"), ("iou", "IoU")):
            before = metrics.get(f"base_eval_{key}")
            if after[key] is None:
                continue
            if before is None:
                lines.append(f"  {name:<4} {after[key]:.3f}")
            else:
                change = after[key] - before
                lines.append(f"  {name:<4} {before:.3f} -> {after[key]:.3f} ({change:+.3f})")
        baseline = metrics.get("base_eval_box_baseline_dice")
        if baseline is not None:
            lines.append(f'  "fill the box" baseline Dice {baseline:.3f}')
    out = os.path.normpath(output_dir)
    lines.append(f"Model and model card: {out}/ (README.md)" + (f", pushed to {hub_model_id}" if hub_model_id else ""))
    if figures:
        lines.append("Figures: " + ", ".join(os.path.join(out, Path(f).name) for f in figures))
    if next_command:
        lines.append(f"Next, compare the base and tuned models on the same images:\n  {next_command}")
    return "\n".join(lines)


def quarantine_damaged(*splits: datasets.Dataset | None) -> str:
    """Verify the embedding caches behind `splits` row by row and move the damaged ones aside; say what was done."""
    moved = []
    for ds in splits:
        for entry in ds.cache_files if ds is not None else []:
            path = Path(entry["filename"])
            if len(path.stem) == 32 and path.suffix == ".arrow":  # <fingerprint>.arrow, not a datasets cache-*.arrow
                problem = verify_embedding_cache(path) if path.is_file() else None
                if problem is not None:
                    moved.append(f"{path} ({problem}) was moved to {quarantine(path, problem)}")
    if not moved:
        return "No damaged cache file was found on disk."
    return "; ".join(moved) + ". Run the same command again to rebuild it."


def check_arguments(training_args: TrainingArguments) -> None:
    """Refuse `TrainingArguments` values that would silently do something else than asked."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(
            f"--max_steps must be a positive number of optimizer steps, or -1 (the default) to train for "
            f"--num_train_epochs; got {training_args.max_steps}."
        )


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


def reshard_for_workers(stream: datasets.IterableDataset, num_workers: int) -> datasets.IterableDataset:
    """`stream`, split into more shards when it has fewer than `num_workers` and its format allows (Parquet: one shard
    per row group).

    Each dataloader worker reads whole shards of a stream, and `datasets` stops the workers that get none: a Hub
    dataset stored in one Parquet file would be read and transformed by one worker however many were asked for.
    """
    if num_workers <= stream.num_shards:
        return stream
    reshard = getattr(stream, "reshard", None)  # not in older datasets
    try:
        resharded = reshard() if reshard is not None else stream
    except NotImplementedError:  # a format datasets cannot split
        resharded = stream
    if resharded.num_shards > stream.num_shards:
        logger.info(
            "--streaming: the training stream has %d shard(s) for %d dataloader workers; split into %d (Parquet row "
            "groups) so that every worker reads.",
            stream.num_shards,
            num_workers,
            resharded.num_shards,
        )
    if resharded.num_shards < num_workers:
        logger.warning(
            "--streaming: the training stream has %d shard(s), so only %d of the %d dataloader workers read it (each "
            "reads whole shards). A dataset stored in more files or row groups is read by more workers.",
            resharded.num_shards,
            resharded.num_shards,
            num_workers,
        )
    return resharded


def _image_key(image: Any) -> tuple:
    """A decoded image's identity in a stream: its shape and a checksum of its pixels."""
    pixels = np.ascontiguousarray(np.asarray(image))
    return pixels.shape, str(pixels.dtype), zlib.crc32(pixels)


def _undecoded(ds: datasets.Dataset | datasets.IterableDataset) -> tuple[Any, dict[str, datasets.Image]]:
    """`ds` with its decoded `Image` columns left encoded, and those columns' features to put back."""
    images = {c: f for c, f in (ds.features or {}).items() if isinstance(f, datasets.Image) and f.decode}
    for column in images:
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds, images


def streaming_splits(
    source: datasets.IterableDatasetDict, data_args: DataArguments, seed: int, num_workers: int = 0
) -> tuple[datasets.IterableDataset, datasets.Dataset | None]:
    """The streamed training split (shuffled through a buffer, reshuffled every epoch) and an evaluation split read
    into memory: `--eval_split` when the source has it, otherwise the first `--max_eval_samples` (default 32)
    training rows, whose images the training stream then leaves out. The training stream is split into at least
    `num_workers` shards where its format allows (`reshard_for_workers`).

    The evaluation rows are left out by image rather than with `IterableDataset.skip`: `datasets` spreads a skip over
    the dataloader workers (each skips its share of its own shards), so with several workers some evaluation rows
    would be trained on and as many training rows lost.
    """
    if data_args.train_split not in source:
        raise ValueError(
            f"--train_split {data_args.train_split!r} is not a split of the dataset; splits: {', '.join(source)}."
        )
    train = reshard_for_workers(source[data_args.train_split], num_workers)
    n_eval, carved = data_args.max_eval_samples, False
    if data_args.eval_split and data_args.eval_split in source:
        eval_stream = source[data_args.eval_split]
    elif data_args.validation_split_percentage:
        n_eval, carved, eval_stream = n_eval or 32, True, train
        logger.info(
            "Streaming without a %r split: the first %d training rows are the evaluation split",
            data_args.eval_split,
            n_eval,
        )
    else:
        eval_stream = None
    eval_ds = None
    if eval_stream is not None:
        # Read with images still encoded: they are stored as they came, not decoded and encoded again.
        eval_stream, images = _undecoded(eval_stream.take(n_eval) if n_eval else eval_stream)
        eval_ds = datasets.Dataset.from_list(list(eval_stream), features=eval_stream.features)
        for column, feature in images.items():
            eval_ds = eval_ds.cast_column(column, feature)
        if carved:
            # In the dataloader workers, on the images they decode anyway.
            held_out = {_image_key(image) for image in eval_ds["image"]}
            train = train.filter(lambda image: _image_key(image) not in held_out, input_columns="image")
        logger.info("Read %d evaluation rows from the stream into memory", len(eval_ds))
    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    return train.shuffle(seed=seed, buffer_size=1000), eval_ds


def _setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler()],
    )
    level = training_args.get_process_log_level()
    logging.getLogger("sam_hf").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def run_training(
    model_args: ModelArguments, data_args: DataArguments, sam_args: SamArguments, training_args: TrainingArguments
) -> dict[str, float]:
    """Fine-tune a SAM mask decoder with box prompts; returns the merged metrics (base, train, eval).

    The flow is the one of the transformers example scripts: load, preprocess, `train`, `save_model`,
    `log_metrics` / `save_metrics` / `save_state`, `evaluate`, then `push_to_hub` or `create_model_card`.
    """
    _setup_logging(training_args)
    # Everything that can refuse the run does so here, before the data, the model or the Hub is touched.
    check_arguments(training_args)
    if data_args.streaming:
        if training_args.max_steps <= 0:
            raise ValueError(
                "--streaming reads the training split as a stream of unknown length: pass --max_steps (optimizer "
                "steps) instead of --num_train_epochs."
            )
        if sam_args.cache_embeddings:
            logger.info("--streaming: training without the embedding cache (the encoder runs at every step).")
            sam_args.cache_embeddings = False
    check_output_dir(training_args, sam_args.overwrite_output_dir)
    if training_args.should_log:
        default = default_output_dir(model_args.model_name_or_path, data_args.dataset_name)
        log = logger.warning if os.path.normpath(training_args.output_dir) == default else logger.info
        log(
            "Writing the run to %s%s",
            training_args.output_dir,
            " (no --output_dir given)" if log is logger.warning else "",
        )
    if training_args.push_to_hub and training_args.process_index == 0:
        check_hub_access(training_args.hub_model_id, training_args.hub_token)
    if training_args.ddp_find_unused_parameters is None:
        # Parameters single-mask training never reaches are frozen (freeze_unused_decoder_outputs), so DDP need not
        # search the graph for them at every step.
        training_args.ddp_find_unused_parameters = False
    if training_args.dataloader_pin_memory and training_args.device.type == "cpu":
        # Pinned host memory only speeds up copies to an accelerator; without one, torch warns on every dataloader.
        training_args.dataloader_pin_memory = False
        logger.info("dataloader_pin_memory turned off: training on the CPU.")
    set_seed(training_args.seed)

    model, processor = load_model_and_processor(
        model_args.model_name_or_path, model_args.model_revision, model_args.token, model_args.cache_dir
    )
    family_of(model).prepare_for_training(model)
    # The crops a model is tuned on travel with it (config.json): scripts/predict.py decodes on the same crops.
    if data_args.object_crop_scale:
        model.config.object_crop_scale = data_args.object_crop_scale
    elif hasattr(model.config, "object_crop_scale"):
        del model.config.object_crop_scale
    freeze_modules(model, sam_args.freeze_vision_encoder, sam_args.freeze_prompt_encoder)
    multimask_every = multimask_stride(sam_args)
    if not multimask_every:
        # Box-only single-mask training never reaches the multimask outputs, nor the IoU head without its loss.
        freeze_unused_decoder_outputs(model, train_iou_head=sam_args.iou_loss_weight > 0)
    params = count_parameters(model)
    logger.info("Parameters after freezing: %s", params)
    if sam_args.lora_rank:
        model = add_lora_adapters(
            model, sam_args.lora_rank, sam_args.lora_alpha, sam_args.lora_dropout, sam_args.lora_target_modules
        )
        logger.warning("LoRA adapters train the image encoder: no embedding cache, the encoder runs at every step.")
        params = count_parameters(model)
        logger.info("Parameters with the LoRA adapters: %s", params)

    with training_args.main_process_first(desc="dataset preprocessing"):
        source = load_source(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.image_column,
            data_args.mask_column,
            model_args.cache_dir,
            model_args.token,
            streaming=data_args.streaming,
        )
        if data_args.streaming:
            train_ds, eval_ds = streaming_splits(
                source, data_args, training_args.seed, num_workers=training_args.dataloader_num_workers
            )
        else:
            train_ds, eval_ds = split_source(
                source,
                data_args.train_split,
                data_args.eval_split,
                data_args.validation_split_percentage,
                training_args.seed,
            )
        train_ds = prepare_split(train_ds, data_args, "train")
        if eval_ds is not None:
            eval_ds = prepare_split(eval_ds, data_args, "eval")
        if sam_args.cache_embeddings:
            # The frozen encoder runs once per image here, never in the training loop.
            embed = partial(
                add_image_embeddings,
                model=model,
                image_processor=processor.image_processor,
                dtype=sam_args.embedding_dtype,
                batch_size=sam_args.embedding_batch_size,
                cache_dir=sam_args.embedding_cache_dir,
                device=training_args.device,
                num_workers=data_args.preprocessing_num_workers,
                # The precision training runs in: cached and uncached training then see the same encoder output.
                autocast_dtype=torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None,
            )
            train_ds = embed(train_ds, split_name="train").remove_columns("image")
            if eval_ds is not None:
                eval_ds = embed(eval_ds, split_name="eval")
        # Four raw eval rows for the prediction figure (the cached split drops its image column below), spread over
        # the split: with tiles or object crops, neighbouring rows come from the same image.
        figure_images = None
        if eval_ds is not None:
            figure_images = eval_ds.select(sorted({round(i) for i in np.linspace(0, len(eval_ds) - 1, 4)}))
        if eval_ds is not None and "image_embeddings" in eval_ds.column_names:
            eval_ds = eval_ds.remove_columns("image")

    box_baseline = box_baseline_dice(eval_ds) if eval_ds is not None else None
    train_transform = SamTransform(
        processor,
        train=True,
        box_jitter=sam_args.box_jitter,
        max_objects_per_image=sam_args.max_objects_per_image,
        mask_type=data_args.label_mask_type,
        seed=training_args.seed,
        point_prompts=bool(multimask_every) or "point" in sam_args.prompt_types,
        background_points=bool(multimask_every) and sam_args.background_point_weight > 0,
    )
    if isinstance(train_ds, datasets.IterableDataset):
        # Rows are transformed as they stream in (in the dataloader workers), batched like with_transform.
        train_ds = train_ds.map(train_transform, batched=True, batch_size=16, remove_columns=train_ds.column_names)
    else:
        train_ds = train_ds.with_transform(train_transform)
    if eval_ds is not None:
        eval_ds = eval_ds.with_transform(
            SamTransform(processor, train=False, mask_type=data_args.label_mask_type, with_instances=True)
        )

    frozen = [
        n
        for n, f in (
            ("vision_encoder", sam_args.freeze_vision_encoder),
            ("prompt_encoder", sam_args.freeze_prompt_encoder),
        )
        if f
    ]
    card_info = {
        # A local directory is named by its folder; a Hub id is kept as it is.
        "base_model": Path(model_args.model_name_or_path).name
        if Path(model_args.model_name_or_path).exists()
        else model_args.model_name_or_path,
        "dataset_name": data_args.dataset_name,
        "frozen_modules": [
            f"{n} (base weights; LoRA adapters trained)" if n == "vision_encoder" and sam_args.lora_rank else n
            for n in frozen
        ],
        "lora": lora_card_info(model, sam_args.lora_merge) if sam_args.lora_rank else None,
        "trainable_parameters": str(params),
        "loss": loss_description(sam_args),
        "multimask_training": sam_args.multimask_training,
        "multimask_every": multimask_every,
        "iou_head_trained": bool(multimask_every) or sam_args.iou_loss_weight > 0,
        "prompt_recipe": prompt_recipe(data_args, sam_args),
        "box_baseline_dice": box_baseline,
    }
    callbacks = []
    if sam_args.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=sam_args.early_stopping_patience))

    trainer = SamTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        # Under torch.compile every batch holds the same number of objects, so the decoder compiles once.
        data_collator=SamDataCollator(
            pad_to_multiple_of=sam_args.max_objects_per_image if training_args.torch_compile else None
        ),
        # The image processor, not the SamProcessor: Trainer.train() looks for a tokenizer on any ProcessorMixin.
        # SamProcessor.from_pretrained and pipeline() load the saved image processor config as they are.
        processing_class=processor.image_processor,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        loss_fn=SamDiceCELoss(sam_args.lambda_dice, sam_args.lambda_ce),
        card_info=card_info,
        iou_loss_weight=sam_args.iou_loss_weight,
        multimask_every=multimask_every,
        background_point_weight=sam_args.background_point_weight,
        lora_merge=sam_args.lora_merge,
        prompt_types=parse_prompt_types(sam_args.prompt_types),
        num_correction_rounds=sam_args.num_correction_rounds,
    )

    if isinstance(train_ds, datasets.IterableDataset):
        trainer.add_callback(PromptEpochCallback(train_transform))
    all_metrics: dict[str, float] = {}
    if eval_ds is not None and sam_args.eval_before_training:
        base = trainer.evaluate(metric_key_prefix="base_eval")
        base["base_eval_box_baseline_dice"] = box_baseline
        trainer.log_metrics("base_eval", base)
        trainer.save_metrics("base_eval", base)
        card_info["metrics_before"] = {k.removeprefix("base_eval_"): v for k, v in base.items()}
        all_metrics.update(base)

    try:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except EmbeddingCacheError as err:
        raise EmbeddingCacheError(f"{err} {quarantine_damaged(train_ds, eval_ds)}") from err
    trainer.save_model()
    metrics = train_result.metrics
    if not isinstance(train_ds, datasets.IterableDataset):
        metrics["train_samples"] = len(train_ds)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    all_metrics.update(metrics)

    if eval_ds is not None:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_ds)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        card_info["metrics_after"] = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        all_metrics.update(metrics)

    figures: list[Path] = []
    if trainer.is_world_process_zero():
        # The model and metrics are saved: an optional figure must not fail the run, nor keep the card or the push
        # from happening.
        try:
            figures = write_figures(trainer, processor, figure_images, data_args.label_mask_type)
        except Exception as err:
            logger.warning("Figures not written (%s: %s).", type(err).__name__, err, exc_info=True)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training")
    else:
        trainer.create_model_card()
    if trainer.is_world_process_zero():
        # Last, after every progress bar: what the run achieved, where it is, and what to run next.
        summary = training_summary(
            all_metrics,
            training_args.output_dir,
            figures,
            best_step=trainer.state.best_global_step if training_args.load_best_model_at_end else None,
            eval_images=len(eval_ds) if eval_ds is not None else None,
            next_command=evaluate_command(
                model_args.model_name_or_path, training_args.output_dir, data_args, training_args.seed
            )
            if eval_ds is not None
            else None,
            hub_model_id=training_args.hub_model_id if training_args.push_to_hub else None,
            eval_unit=data_args.eval_unit,
        )
        if training_args.log_level == "passive":
            # The summary shows at the default verbosity, which keeps sam_hf's other info lines quiet.
            SUMMARY_LOGGER.setLevel(logging.INFO)
        SUMMARY_LOGGER.info("%s", summary)
    return all_metrics

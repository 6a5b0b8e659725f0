"""The training job behind `scripts/train.py`, callable in-process.

`run_training` reads top to bottom like the `main()` of the transformers example scripts: check the arguments,
load the model, prepare the datasets, build the trainer, evaluate the base model, train, save, log and save the
metrics, evaluate, then push to the Hub or write the card. Each step is a function of this module.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import EarlyStoppingCallback, TrainingArguments, set_seed
from transformers.trainer_utils import TrainOutput

from ..config.arguments import DataArguments, ModelArguments, SamArguments, multimask_stride, parse_prompt_types
from ..config.parser import default_output_dir
from ..core.images import processor_longest_edge
from ..data.cache import EmbeddingCacheError, add_image_embeddings, quarantine_damaged
from ..data.collator import SamDataCollator
from ..data.indexing import prepare_split
from ..data.sources import load_source, split_source
from ..data.streaming import streaming_splits
from ..data.transforms import SamTransform
from ..family.lora import add_lora_adapters, lora_card_info
from ..family.modeling import (
    ParameterCount,
    count_parameters,
    freeze_modules,
    freeze_unused_decoder_outputs,
    load_model_and_processor,
)
from ..family.registry import family_of
from ..hub.access import check_hub_access
from .callbacks import PromptEpochCallback
from .loss import SamDiceCELoss
from .metrics import compute_metrics
from .output_dir import check_output_dir
from .report import (
    SUMMARY_LOGGER,
    box_baseline_dice,
    evaluate_command,
    loss_description,
    prompt_recipe,
    training_summary,
    write_figures,
)
from .trainer import SamTrainer

logger = logging.getLogger(__name__)


def run_training(
    model_args: ModelArguments, data_args: DataArguments, sam_args: SamArguments, training_args: TrainingArguments
) -> dict[str, float]:
    """Fine-tune a SAM mask decoder with box prompts; returns the merged metrics (base, train, eval).

    The flow is the one of the transformers example scripts: load, preprocess, `train`, `save_model`,
    `log_metrics` / `save_metrics` / `save_state`, `evaluate`, then `push_to_hub` or `create_model_card`.
    """
    _setup_logging(training_args)
    # Everything that can refuse the run does so here, before the data, the model or the Hub is touched.
    prepare_run(model_args, data_args, sam_args, training_args)
    set_seed(training_args.seed)

    multimask_every = multimask_stride(sam_args)
    model, processor, params = load_model(model_args, data_args, sam_args, multimask_every)
    with training_args.main_process_first(desc="dataset preprocessing"):
        train_ds, eval_ds, figure_images = prepare_datasets(
            model, processor, model_args, data_args, sam_args, training_args
        )
    box_baseline = box_baseline_dice(eval_ds) if eval_ds is not None else None
    train_ds, eval_ds, train_transform = add_transforms(
        train_ds, eval_ds, processor, data_args, sam_args, training_args.seed, multimask_every
    )
    card_info = model_card_info(model, params, model_args, data_args, sam_args, multimask_every, box_baseline)
    trainer = build_trainer(
        model, processor, train_ds, eval_ds, train_transform, card_info, sam_args, training_args, multimask_every
    )

    all_metrics: dict[str, float] = {}
    if eval_ds is not None and sam_args.eval_before_training:
        all_metrics.update(evaluate_base_model(trainer, box_baseline))

    train_result = train(trainer, train_ds, eval_ds, training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = train_result.metrics
    if not isinstance(train_ds, datasets.IterableDataset):
        metrics["train_samples"] = len(train_ds)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    all_metrics.update(metrics)

    if eval_ds is not None:
        all_metrics.update(evaluate_tuned_model(trainer, eval_ds))

    figures = write_figures_if_possible(trainer, processor, figure_images, data_args.label_mask_type)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training")
    else:
        trainer.create_model_card()
    log_summary(trainer, all_metrics, figures, eval_ds, model_args, data_args, training_args)
    return all_metrics


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


def check_arguments(training_args: TrainingArguments) -> None:
    """Refuse `TrainingArguments` values that would silently do something else than asked."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(
            f"--max_steps must be a positive number of optimizer steps, or -1 (the default) to train for "
            f"--num_train_epochs; got {training_args.max_steps}."
        )


def prepare_run(
    model_args: ModelArguments, data_args: DataArguments, sam_args: SamArguments, training_args: TrainingArguments
) -> None:
    """Refuse the run, or adjust its arguments, before the data, the model or the Hub is touched: the arguments, the
    output directory and Hub access are checked, and the settings that depend on streaming or on the machine set."""
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


def load_model(
    model_args: ModelArguments, data_args: DataArguments, sam_args: SamArguments, multimask_every: int
) -> tuple[torch.nn.Module, Any, ParameterCount]:
    """The model to tune and its processor, with the frozen parts frozen and the LoRA adapters added.

    Returns:
        `(model, processor, params)`, `params` being `count_parameters` of the model as it trains.
    """
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
    return model, processor, params


def prepare_datasets(
    model: torch.nn.Module,
    processor: Any,
    model_args: ModelArguments,
    data_args: DataArguments,
    sam_args: SamArguments,
    training_args: TrainingArguments,
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | None, datasets.Dataset | None]:
    """The indexed training and evaluation splits (with their image embeddings when they are cached), and up to four
    raw evaluation rows for the prediction figure.

    Returns:
        `(train_ds, eval_ds, figure_images)`; `eval_ds` and `figure_images` are `None` without an evaluation split.
    """
    # Images too elongated for the processor's input and label sides are skipped, counted and logged.
    longest_edge = processor_longest_edge(processor, labels=True)
    train_ds, eval_ds = load_splits(model_args, data_args, training_args, longest_edge)
    if sam_args.cache_embeddings:
        train_ds, eval_ds = cache_embeddings(train_ds, eval_ds, model, processor, data_args, sam_args, training_args)
    # Four raw eval rows for the prediction figure (the cached split drops its image column below), spread over
    # the split: with tiles or object crops, neighbouring rows come from the same image.
    figure_images = None
    if eval_ds is not None:
        figure_images = eval_ds.select(sorted({round(i) for i in np.linspace(0, len(eval_ds) - 1, 4)}))
    if eval_ds is not None and "image_embeddings" in eval_ds.column_names:
        eval_ds = eval_ds.remove_columns("image")
    return train_ds, eval_ds, figure_images


def load_splits(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    longest_edge: int | None = None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | None]:
    """The source's training and evaluation splits, indexed (and cut into tiles or object crops) by
    `prepare_split`, without the images too elongated for `longest_edge` (see `prepare_split`); the evaluation split is
    `None` when there is none."""
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
    train_ds = prepare_split(train_ds, data_args, "train", longest_edge)
    if eval_ds is not None:
        eval_ds = prepare_split(eval_ds, data_args, "eval", longest_edge)
    return train_ds, eval_ds


def cache_embeddings(
    train_ds: datasets.Dataset,
    eval_ds: datasets.Dataset | None,
    model: torch.nn.Module,
    processor: Any,
    data_args: DataArguments,
    sam_args: SamArguments,
    training_args: TrainingArguments,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Both splits with each image's embedding (`add_image_embeddings`): the frozen encoder runs once per image here,
    never in the training loop. The training split drops its images; the evaluation split keeps them for now."""
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
    return train_ds, eval_ds


def add_transforms(
    train_ds: datasets.Dataset | datasets.IterableDataset,
    eval_ds: datasets.Dataset | None,
    processor: Any,
    data_args: DataArguments,
    sam_args: SamArguments,
    seed: int,
    multimask_every: int,
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | None, SamTransform]:
    """Attach the `SamTransform`s that make each row's model inputs and labels: with the prompt randomness of
    training on the training split, with exact boxes and the instance maps the metrics need on the evaluation split.

    Returns:
        `(train_ds, eval_ds, train_transform)`.
    """
    train_transform = SamTransform(
        processor,
        train=True,
        box_jitter=sam_args.box_jitter,
        max_objects_per_image=sam_args.max_objects_per_image,
        mask_type=data_args.label_mask_type,
        seed=seed,
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
    return train_ds, eval_ds, train_transform


def model_card_info(
    model: torch.nn.Module,
    params: ParameterCount,
    model_args: ModelArguments,
    data_args: DataArguments,
    sam_args: SamArguments,
    multimask_every: int,
    box_baseline: float | None,
) -> dict[str, Any]:
    """The run's facts for the model card (`sam_hf.hub.render_model_card`); the metrics are added as they come."""
    frozen = [
        n
        for n, f in (
            ("vision_encoder", sam_args.freeze_vision_encoder),
            ("prompt_encoder", sam_args.freeze_prompt_encoder),
        )
        if f
    ]
    return {
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


def build_trainer(
    model: torch.nn.Module,
    processor: Any,
    train_ds: datasets.Dataset | datasets.IterableDataset,
    eval_ds: datasets.Dataset | None,
    train_transform: SamTransform,
    card_info: dict[str, Any],
    sam_args: SamArguments,
    training_args: TrainingArguments,
    multimask_every: int,
) -> SamTrainer:
    """The `SamTrainer` of the run, with its loss settings, collator, metrics and callbacks."""
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
    return trainer


def evaluate_base_model(trainer: SamTrainer, box_baseline: float | None) -> dict[str, float]:
    """The `base_eval_*` metrics of the model before tuning, logged, saved and kept for the card."""
    base = trainer.evaluate(metric_key_prefix="base_eval")
    base["base_eval_box_baseline_dice"] = box_baseline
    trainer.log_metrics("base_eval", base)
    trainer.save_metrics("base_eval", base)
    trainer.card_info["metrics_before"] = {k.removeprefix("base_eval_"): v for k, v in base.items()}
    return base


def train(
    trainer: SamTrainer,
    train_ds: datasets.Dataset | datasets.IterableDataset,
    eval_ds: datasets.Dataset | None,
    resume_from_checkpoint: str | bool | None,
) -> TrainOutput:
    """`trainer.train`; a damaged embedding-cache entry is quarantined, and the error says what to run next."""
    try:
        return trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except EmbeddingCacheError as err:
        raise EmbeddingCacheError(f"{err} {quarantine_damaged(train_ds, eval_ds)}") from err


def evaluate_tuned_model(trainer: SamTrainer, eval_ds: datasets.Dataset) -> dict[str, float]:
    """The `eval_*` metrics of the tuned model, logged, saved and kept for the card."""
    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(eval_ds)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.card_info["metrics_after"] = {k.removeprefix("eval_"): v for k, v in metrics.items()}
    return metrics


def write_figures_if_possible(
    trainer: SamTrainer, processor: Any, figure_images: datasets.Dataset | None, mask_type: str
) -> list[Path]:
    """`write_figures` on the main process; a failure is logged as a warning and no figure is listed."""
    if not trainer.is_world_process_zero():
        return []
    # The model and metrics are saved: an optional figure must not fail the run, nor keep the card or the push from
    # happening.
    try:
        return write_figures(trainer, processor, figure_images, mask_type)
    except Exception as err:
        logger.warning("Figures not written (%s: %s).", type(err).__name__, err, exc_info=True)
        return []


def log_summary(
    trainer: SamTrainer,
    all_metrics: dict[str, float],
    figures: list[Path],
    eval_ds: datasets.Dataset | None,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
) -> None:
    """Last, after every progress bar, on the main process: what the run achieved, where it is, and what to run
    next."""
    if not trainer.is_world_process_zero():
        return
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

"""The Hub side of a run: the model card, rendered from the top-level `model_card.md` template through
`huggingface_hub.ModelCard`, and the check that `--push_to_hub` can reach the Hub before training starts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..family.registry import family_of

logger = logging.getLogger(__name__)


HYPERPARAMETERS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "warmup_steps",
    "lr_scheduler_type",
    "weight_decay",
    "optim",
    "seed",
)


# Figures the card embeds when they exist in the output dir at rendering time, with their captions.
FIGURES = (
    ("loss_curves.png", "Training and evaluation loss, and evaluation Dice"),
    ("eval_predictions.png", "Fine-tuned predictions against the ground truth on evaluation images"),
    ("base_vs_tuned.png", "Base and fine-tuned model on the same images and prompts"),
)


def model_card_template() -> Path:
    """Path of the card template: `model_card.md` at the top of the source tree, shipped inside the package as
    `sam_hf/hub/model_card.md` (a link to it in the source tree, a copy in a built wheel)."""
    path = Path(__file__).resolve().parent / "model_card.md"
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {path} not found; reinstall sam_hf.")
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))


def render_model_card(trainer: Any, **info: Any) -> ModelCard:
    """Render the card of a `SamTrainer` run.

    `info` carries what the trainer does not know: `base_model`, `dataset_name`, `frozen_modules`, `loss`,
    `prompt_recipe`, `metrics_before` and `metrics_after` (dicts with `dice` / `iou`). Trainer keyword arguments that
    `Trainer.push_to_hub` forwards (`model_name`, `tags`, `language`, ...) are accepted; unknown ones are ignored.

    A card is always returned: when the full card cannot be rendered (a broken template, an unexpected metric
    value), the failure is logged as a warning and a minimal card with the same kind of metadata (`library_name`,
    `pipeline_tag`, `base_model`, tags) is returned instead, so that a finished run never fails on its card.
    """
    try:
        return _render_full_card(trainer, info)
    except Exception as err:
        logger.warning(
            "The full model card could not be rendered (%s: %s); writing a minimal card instead.",
            type(err).__name__,
            err,
            exc_info=True,
        )
    args = trainer.args
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="mask-generation",
        base_model=info.get("base_model"),
        tags=["sam", "segment-anything", "mask-generation", "sam_hf", *(info.get("tags") or [])],
        license=info.get("license"),
    )
    return ModelCard.from_template(
        card_data,
        model_id=args.hub_model_id or Path(args.output_dir).name,
        model_summary=f"{getattr(getattr(trainer, 'family', None), 'name', 'SAM')} fine-tuned with sam_hf from "
        f"{info.get('base_model')} on {info.get('dataset_name')}. "
        "The full card could not be rendered; the run's metrics are in its *_results.json files.",
    )


def _render_full_card(trainer: Any, info: dict[str, Any]) -> ModelCard:
    args = trainer.args
    before, after = info.get("metrics_before") or {}, info.get("metrics_after") or {}
    dataset = info.get("dataset_name")
    model_id = args.hub_model_id or Path(args.output_dir).name
    eval_results = [
        EvalResult(
            task_type="mask-generation",
            dataset_type=str(dataset),
            dataset_name=str(dataset),
            metric_type=name,
            metric_name=f"Per-object {label} (box prompts)",
            metric_value=value,
        )
        for name, label in (("dice", "Dice"), ("iou", "IoU"))
        if (value := after.get(name)) is not None and dataset
    ]
    family = getattr(trainer, "family", None) or family_of("sam")
    facts = family.card_facts()
    tags = ["sam", "segment-anything", "mask-generation", "sam_hf", *(info.get("tags") or [])]
    if facts["model_type"] not in tags:
        tags.insert(1, facts["model_type"])
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="mask-generation",
        base_model=info.get("base_model"),
        datasets=[dataset] if dataset and not Path(dataset).exists() else None,
        tags=tags,
        license=info.get("license"),
        model_name=model_id,
        eval_results=eval_results or None,
    )
    hyperparameters = {name: getattr(getattr(args, name), "value", getattr(args, name)) for name in HYPERPARAMETERS}
    hyperparameters["world_size"] = args.world_size
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template()),
        model_id=model_id,
        base_model=info.get("base_model"),
        dataset_name=dataset,
        frozen_modules=", ".join(info.get("frozen_modules") or []) or "none",
        trainable_parameters=info.get("trainable_parameters"),
        loss=info.get("loss"),
        prompt_recipe=info.get("prompt_recipe"),
        hyperparameters=hyperparameters,
        before={k: _fmt(before.get(k)) for k in ("dice", "iou")},
        after={k: _fmt(after.get(k)) for k in ("dice", "iou")},
        num_eval_objects=after.get("num_objects") or before.get("num_objects"),
        box_baseline=_fmt(info.get("box_baseline_dice")),
        multimask_training=bool(info.get("multimask_training")),
        multimask_every=info.get("multimask_every") or 0,
        iou_head_trained=bool(info.get("iou_head_trained", getattr(trainer, "iou_loss_weight", 0) > 0)),
        figures=[name for name, _ in FIGURES if (Path(args.output_dir) / name).is_file()],
        figure_captions=dict(FIGURES),
        lora=info.get("lora"),
        **facts,
    )

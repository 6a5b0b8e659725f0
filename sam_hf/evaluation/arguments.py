"""Arguments of `scripts/evaluate.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EvaluateArguments:
    """What to evaluate and where to write it (the data side is `DataArguments`, as for training)."""

    model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "One or more models as name=path_or_hub_id (or just a path; the name is then its folder name), "
            "e.g. --model base=facebook/sam-vit-base tuned=runs/my-run"
        },
    )
    output_dir: str = field(default="eval", metadata={"help": "Where metrics.json, metrics.md and figures go."})
    split: str = field(
        default="eval",
        metadata={
            "help": "'eval': the held-out split train.py evaluates on (same --seed and --validation_split_percentage "
            "carve it the same way); 'train': the training split."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed that carved the eval split (train.py's --seed)."})
    box_jitter: float = field(
        default=0.0, metadata={"help": "Jitter eval boxes outward by up to this many pixels (robustness); 0 = exact."}
    )
    jitter_seed: int = field(default=0, metadata={"help": "Seed of the box jitter; the same boxes for every model."})
    chunk_size: int = field(default=64, metadata={"help": "Prompts decoded and upsampled at once."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; cuda if available, else cpu."})
    num_figure_images: int = field(default=4, metadata={"help": "Images in the base-vs-tuned figure (0 = none)."})
    automatic: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate automatic mask generation (pipeline('mask-generation')): per ground-truth object "
            "the best IoU of any generated mask, recall and precision at IoU 0.5."
        },
    )
    points_per_crop: int = field(default=16, metadata={"help": "Automatic mode: points per side of the point grid."})
    crops_n_layers: int = field(
        default=0,
        metadata={"help": "Automatic mode: the pipeline's crop layers (layer k adds 4^k crops of the image; slower)."},
    )
    pred_iou_thresh: float = field(
        default=0.88,
        metadata={"help": "Automatic mode: keep masks whose predicted IoU reaches this (pipeline default)."},
    )
    stability_score_thresh: float = field(
        default=0.95, metadata={"help": "Automatic mode: keep masks at least this stable (pipeline default)."}
    )
    interactive_clicks: int = field(
        default=0,
        metadata={
            "help": "Also simulate interactive correction (0: off): per object, Dice after the first prompt (an exact "
            "box, and separately one click at the object's innermost pixel) and after each of this many correction "
            "clicks at the innermost pixel of the larger error region, the previous logits fed back as mask prompt. "
            "Writes interactive_curve.png."
        },
    )
    interactive_max_objects: int = field(
        default=16,
        metadata={"help": "Interactive mode: objects per image (the first ones), to bound its cost."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hub download cache."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or data; never logged."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("Give at least one --model (name=path_or_hub_id).")
        if self.split not in ("eval", "train"):
            raise ValueError(f"--split must be 'eval' or 'train', got {self.split!r}.")
        if self.interactive_clicks < 0 or self.interactive_max_objects < 1:
            raise ValueError(
                f"--interactive_clicks must be >= 0 and --interactive_max_objects >= 1, got {self.interactive_clicks} "
                f"and {self.interactive_max_objects}."
            )
        if self.box_jitter < 0:
            raise ValueError(f"--box_jitter must be >= 0 pixels, got {self.box_jitter}.")
        if self.crops_n_layers < 0:
            raise ValueError(f"--crops_n_layers must be >= 0, got {self.crops_n_layers}.")


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """`["base=a", "runs/b"]` -> `{"base": "a", "b": "runs/b"}`; names must be unique."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        if not name or not path:
            raise ValueError(f"--model {spec!r}: expected name=path_or_hub_id or a path.")
        if name in models:
            raise ValueError(f"--model name {name!r} is used twice; give each model its own name (name=path).")
        models[name] = path
    return models

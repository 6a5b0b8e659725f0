"""Command-line arguments of `scripts/train.py`, parsed with `HfArgumentParser` beside `TrainingArguments`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers.utils import is_peft_available

from ..core.env import INSTALL_HINT
from ..core.masks import MASK_TYPES
from ..core.windows import check_crop_scale

PROMPT_TYPES = ("box", "point", "box+point")


def parse_prompt_types(value: str | Sequence[str]) -> tuple[str, ...]:
    """`"box,point"` -> `("box", "point")`, checking each against `PROMPT_TYPES`."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in PROMPT_TYPES]
    if not items or bad:
        raise ValueError(
            f"--prompt_types must be a comma-separated list of {', '.join(PROMPT_TYPES)}; got {value!r}"
            + (f" ({', '.join(map(repr, bad))} unknown)." if bad else ".")
        )
    return tuple(dict.fromkeys(items))


@dataclass
class ModelArguments:
    """Which SAM checkpoint to start from."""

    model_name_or_path: str = field(
        metadata={
            "help": "A Hub id such as facebook/sam-vit-base, or a local directory with a saved SamModel and "
            "SamProcessor."
        }
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit id)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    token: str | None = field(
        default=None, metadata={"help": "Hub token; defaults to the one `hf auth login` stored."}
    )


@dataclass
class DataArguments:
    """Where the images and masks come from and how they are split."""

    dataset_name: str = field(
        metadata={
            "help": "A Hub dataset id, a directory written by save_to_disk, a folder with images/ and masks/ "
            "(and optional instances/) sharing file stems, or COCO instance annotations (a json file, or a folder "
            "holding instances.json)."
        }
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    image_column: str = field(default="image", metadata={"help": "Image column of a Hub or saved dataset."})
    mask_column: str = field(default="label", metadata={"help": "Mask column of a Hub or saved dataset."})
    mask_type: str = field(
        default="auto",
        metadata={
            "help": "How masks become objects: 'instance' (one object per id), 'binary' (connected components), "
            "'semantic' (per class and component), or 'auto' (binary if one non-zero value, else "
            "instance).",
            "choices": list(MASK_TYPES),
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="validation", metadata={"help": "Split to evaluate on, if the dataset has it."})
    validation_split_percentage: float = field(
        default=20.0, metadata={"help": "Percent of train held out (seeded) for evaluation when eval_split is absent."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation images."})
    tile_size: int | None = field(
        default=None,
        metadata={
            "help": "Cut large images into square tiles of this many pixels for training and evaluation "
            "(sam_hf.data.windows); objects cut by a tile edge stay objects of the tile when --tile_min_visible of "
            "them is inside, smaller fragments become background there."
        },
    )
    tile_overlap: int = field(default=0, metadata={"help": "With --tile_size: overlap of neighbouring tiles, px."})
    tile_min_visible: float = field(
        default=0.5, metadata={"help": "With --tile_size: fraction of an object a tile must hold to keep it."}
    )
    object_crop_scale: float | None = field(
        default=None,
        metadata={
            "help": "Train and evaluate on one square crop per object, this many times the longer side of its box and "
            "centred on it (sam_hf.data.windows), so that small and large objects reach the model at the same size; "
            "predict with the same value (scripts/predict.py --object_crop_scale). 6 to 8 suits nuclei."
        },
    )
    point_crop_scale: float | None = field(
        default=None,
        metadata={
            "help": "With --object_crop_scale: also cut one training object in --point_crop_every on a crop this many "
            "times its box, which only the multimask point pass trains on (no box loss). A scale near that of the "
            "whole images teaches the point prompts of pipeline('mask-generation') the objects at the size they have "
            "there, while box prompts stay on --object_crop_scale crops. Evaluation is unchanged. 0 turns it off."
        },
    )
    point_crop_every: int = field(
        default=4, metadata={"help": "With --point_crop_scale: one object in this many gets a point-prompt crop."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training split instead of downloading and indexing it first (Hub datasets too large "
            "for the disk). Needs --max_steps; trains without the embedding cache. The evaluation split (or, without "
            "one, the first --max_eval_samples training rows) is read into memory."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes for cutting tiles or object crops and indexing masks, and for decoding and "
            "preprocessing images while the embedding cache is built (defaults there to min(8, CPUs - 1) on a GPU, "
            "none on CPUs)."
        },
    )

    def __post_init__(self) -> None:
        if self.tile_size is not None:
            if self.tile_size < 16 or not 0 <= self.tile_overlap < self.tile_size:
                raise ValueError(
                    f"--tile_size must be >= 16 and 0 <= --tile_overlap < --tile_size, got {self.tile_size} and "
                    f"{self.tile_overlap}."
                )
            if not 0 < self.tile_min_visible <= 1:
                raise ValueError(f"--tile_min_visible must be in (0, 1], got {self.tile_min_visible}.")
            if self.streaming:
                raise ValueError(
                    "--tile_size cuts a dataset held on disk into tiles; it does not work with --streaming."
                )
        if self.object_crop_scale is not None:
            check_crop_scale(self.object_crop_scale)
            if self.tile_size is not None:
                raise ValueError("--object_crop_scale and --tile_size are two ways to window the images: choose one.")
            if self.streaming:
                raise ValueError(
                    "--object_crop_scale crops a dataset held on disk into objects; it does not work with --streaming."
                )
        if self.point_crop_scale == 0:
            self.point_crop_scale = None  # 0 turns it off, as for a config file that sets it
        if self.point_crop_scale is not None:
            if self.object_crop_scale is None:
                raise ValueError(
                    "--point_crop_scale adds point-prompt crops to object crops: it needs --object_crop_scale."
                )
            check_crop_scale(self.point_crop_scale, name="--point_crop_scale")
        if self.point_crop_every < 1:
            raise ValueError(f"--point_crop_every must be >= 1, got {self.point_crop_every}.")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"--mask_type must be one of {MASK_TYPES}, got {self.mask_type!r}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}."
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}.")

    @property
    def label_mask_type(self) -> str:
        """How the labels the pipeline reads are decoded: tiles (`--tile_size`) and object crops
        (`--object_crop_scale`) carry instance maps, whatever `--mask_type` said of the source's masks."""
        return "instance" if self.tile_size or self.object_crop_scale else self.mask_type

    @property
    def eval_unit(self) -> str:
        """What a row of a prepared split is: `"images"`, `"tiles"` or `"object crops"`."""
        return "tiles" if self.tile_size else "object crops" if self.object_crop_scale else "images"


@dataclass
class PromptArguments:
    """The prompts of each training step: boxes, the multimask point pass, the first prompt's type and the correction
    rounds."""

    box_jitter: float = field(
        default=20.0,
        metadata={
            "help": "Maximum outward shift of each box side, in original-image pixels, for training boxes. "
            "Evaluation boxes are exact."
        },
    )
    max_objects_per_image: int | None = field(
        default=16, metadata={"help": "Cap on box prompts per image per training step, sampled at random."}
    )
    multimask_training: bool = field(
        default=False,
        metadata={
            "help": "Also train SAM's three multimask outputs and its IoU head: each object is prompted a second time "
            "with one random point inside it (as automatic mask generation prompts), with the best-of-3 DiceCE and an "
            "IoU-prediction loss. Makes pipeline('mask-generation') benefit from tuning; costs a second decoder pass."
        },
    )
    multimask_every: int = field(
        default=8,
        metadata={
            "help": "Also prompt every N-th sampled object of each image (a different one at each step) with one "
            "random interior point in a second decoder pass with multimask_output=True, adding its best-of-3 DiceCE "
            "and IoU-prediction loss (summed over those objects and divided by all box-prompted ones: about 1/N of "
            "the weight --multimask_training gives them). It keeps the three multimask outputs and their IoU "
            "predictions, which pipeline('mask-generation') uses, working while the shared decoder layers tune, for "
            "about 1/N of a decoder pass. 0 turns it off (box prompts only; the multimask outputs are frozen). "
            "--multimask_training prompts every object."
        },
    )
    prompt_types: str = field(
        default="box",
        metadata={
            "help": "Comma-separated prompt types of the first prediction, taken in turn one per training step: box "
            "(the jittered box), point (one random interior point), box+point. Evaluation always uses exact boxes."
        },
    )
    num_correction_rounds: int = field(
        default=0,
        metadata={
            "help": "Interactive training (the SAM paper's recipe): after the first prediction, this many rounds each "
            "add one click per object from its larger error region (positive where the mask missed, negative where "
            "it spilled over) and feed the previous low-resolution logits back as the mask prompt; the losses of "
            "all rounds are summed. 0: one prediction per object."
        },
    )

    def _check_prompts(self) -> None:
        if self.multimask_every < 0:
            raise ValueError(f"--multimask_every must be >= 0 (0 turns it off), got {self.multimask_every}.")
        parse_prompt_types(self.prompt_types)
        if self.num_correction_rounds < 0:
            raise ValueError(f"--num_correction_rounds must be >= 0, got {self.num_correction_rounds}.")
        if self.box_jitter < 0:
            raise ValueError(f"--box_jitter must be >= 0 pixels, got {self.box_jitter}.")
        if self.max_objects_per_image is not None and self.max_objects_per_image < 1:
            raise ValueError(f"--max_objects_per_image must be >= 1, got {self.max_objects_per_image}.")


@dataclass
class LossArguments:
    """The weights of the loss terms."""

    background_point_weight: float = field(
        default=0.1,
        metadata={
            "help": "With the multimask point pass: each training image is also prompted with one point on no object, "
            "whose three masks learn to be empty (cross-entropy against an empty target) and whose predicted IoUs "
            "learn 0 (squared, times --iou_loss_weight); this is the weight of that loss, summed over images and "
            "divided by the box-prompted objects. Automatic mask generation's grid points on background then give no "
            "confident blobs. 0 turns it off."
        },
    )
    iou_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the IoU-prediction (MSE) loss: the IoU head learns the actual IoU of the box-prompted "
            "mask (and, with --multimask_training, of the three point-prompted candidates). 0 turns it off and "
            "freezes the IoU head, as sam_hf did before."
        },
    )
    lambda_dice: float = field(default=1.0, metadata={"help": "Weight of the Dice term of DiceCE."})
    lambda_ce: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy term of DiceCE."})

    def _check_loss(self) -> None:
        if self.iou_loss_weight < 0:
            raise ValueError(f"--iou_loss_weight must be >= 0, got {self.iou_loss_weight}.")
        if self.background_point_weight < 0:
            raise ValueError(f"--background_point_weight must be >= 0, got {self.background_point_weight}.")
        if self.lambda_dice < 0 or self.lambda_ce < 0 or self.lambda_dice + self.lambda_ce == 0:
            raise ValueError(
                f"--lambda_dice and --lambda_ce must be >= 0 and not both 0, got {self.lambda_dice} and "
                f"{self.lambda_ce}."
            )


@dataclass
class CacheArguments:
    """The embedding cache, which a frozen vision encoder allows (`SamArguments.freeze_vision_encoder`)."""

    cache_embeddings: bool | None = field(
        default=None,
        metadata={
            "help": "Compute each image's embedding once and train the decoder from a memory-mapped cache. "
            "Defaults to on when the vision encoder is frozen; needs a frozen vision encoder."
        },
    )
    embedding_dtype: str = field(
        default="float16", metadata={"help": "Storage dtype of cached embeddings: float16 or float32."}
    )
    embedding_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images per vision-encoder call while building the embedding cache; defaults to 8 on a GPU and 1 "
            "on CPUs."
        },
    )
    embedding_cache_dir: str | None = field(
        default=None, metadata={"help": "Where embedding caches live; defaults to <datasets cache>/sam_hf/embeddings."}
    )

    def _check_cache(self) -> None:
        """The cache default (on with a frozen vision encoder) and values; after `_check_lora`, which turns it off."""
        if self.cache_embeddings is None:
            self.cache_embeddings = self.freeze_vision_encoder
        if self.cache_embeddings and not self.freeze_vision_encoder:
            raise ValueError("--cache_embeddings needs --freeze_vision_encoder: a trained encoder changes embeddings.")
        if self.embedding_dtype not in ("float16", "float32"):
            raise ValueError(f"--embedding_dtype must be float16 or float32, got {self.embedding_dtype!r}.")


@dataclass
class LoraArguments:
    """LoRA adapters on the frozen image encoder (`SamArguments.freeze_vision_encoder`; no embedding cache)."""

    lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "Train LoRA adapters of this rank on the frozen image encoder (off by default: 0 or none). The "
            "mask decoder still trains in full, the prompt encoder follows --freeze_prompt_encoder, and the embedding "
            "cache is off (the encoder's output changes as it learns). Needs peft: pip install 'sam_hf[lora]'."
        },
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank. Defaults to the rank."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the frozen linear layers that get adapters, matched as peft matches them (the dotted "
            "module name or its end). Default for SAM: qkv, the fused q/k/v projection of every image-encoder "
            "attention block (sam_hf.family.LORA_TARGET_MODULES, per model type)."
        },
    )
    lora_merge: bool = field(
        default=True,
        metadata={
            "help": "With --lora_rank, also write the adapters merged into a plain SamModel checkpoint in "
            "--output_dir (loadable without peft). The adapter itself always goes to <output_dir>/adapter; with "
            "false only the adapter (and its base model reference) is kept."
        },
    )

    def _check_lora(self) -> None:
        """LoRA flags: valid values, peft installed, and no embedding cache (the encoder learns)."""
        if not self.lora_rank:
            given = [f"--{n}" for n in ("lora_alpha", "lora_target_modules") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} configure LoRA adapters, which need --lora_rank >= 1.")
            return
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 1 (or 0 for no adapters), got {self.lora_rank}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not self.freeze_vision_encoder:
            raise ValueError(
                "--lora_rank adds adapters to the frozen image encoder, and --freeze_vision_encoder false trains it "
                "in full; pass only one of them."
            )
        if self.cache_embeddings:
            raise ValueError(
                "--cache_embeddings true cannot be combined with --lora_rank: the LoRA adapters train the image "
                "encoder, so its embeddings change at every step and cannot be cached. Drop --cache_embeddings (with "
                "--lora_rank it defaults to off), or drop --lora_rank to train the decoder from cached embeddings."
            )

        if not is_peft_available():
            raise ImportError(
                f"--lora_rank needs the peft package, which is not installed: run `{INSTALL_HINT}` (or "
                "`pip install 'peft>=0.13'`), or train without --lora_rank."
            )
        self.cache_embeddings = False


# A dataclass lists the fields of its last base first: the flags come in the order prompts, loss, cache, LoRA, then
# the ones of SamArguments itself.
@dataclass
class SamArguments(LoraArguments, CacheArguments, LossArguments, PromptArguments):
    """Prompts, loss, embedding cache, LoRA, freezing, and what may happen to an existing output directory.

    The flags of each concern come from its own dataclass (`PromptArguments`, `LossArguments`, `CacheArguments`,
    `LoraArguments`); the cache and LoRA checks also read `freeze_vision_encoder`, so they run from here.
    """

    freeze_vision_encoder: bool = field(default=True, metadata={"help": "Freeze the ViT image encoder."})
    freeze_prompt_encoder: bool = field(default=True, metadata={"help": "Freeze the prompt encoder."})
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without improvement (EarlyStoppingCallback)."},
    )
    eval_before_training: bool = field(
        default=True, metadata={"help": "Evaluate the base model first, so the card can report before and after."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an --output_dir that already holds files. Without it (or --resume_from_checkpoint), "
            "such a run stops before any work. With it, the previous run's checkpoint-* folders, *_results.json, "
            "trainer_state.json and figures are deleted first, and its model and card are overwritten; other files "
            "are kept."
        },
    )

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_cache()
        self._check_prompts()
        self._check_loss()


def multimask_stride(sam_args: SamArguments) -> int:
    """Every how many objects the multimask point pass prompts: 1 with `--multimask_training`, else
    `--multimask_every` (0: no point pass)."""
    return 1 if sam_args.multimask_training else sam_args.multimask_every

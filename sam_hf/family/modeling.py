"""Loading SAM-family checkpoints, freezing modules and the tiny configuration used offline."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    PretrainedConfig,
    ProcessorMixin,
    SamConfig,
    SamModel,
)

from .registry import family_of

logger = logging.getLogger(__name__)


def init_sam_model(config: SamConfig, seed: int | None = None, position_scale: float = 2.5) -> SamModel:
    """A randomly initialised `SamModel` that can learn from scratch.

    transformers initialises the random Fourier features of the positional encoding with a standard deviation of
    `hidden_size // 2` (48 for `tiny_sam_config()`), harmless when pretrained weights overwrite them. Trained from
    scratch, such high frequencies make positions look like noise, and the decoder cannot relate a box to the image.
    Original SAM draws them with a standard deviation of 1; `position_scale` sets it here. The default of 2.5 stays
    below the Nyquist frequency of a 16 x 16 embedding grid while resolving objects a tenth of the image wide.

    The vision encoder's absolute position embedding (zeros by default) starts as the same Fourier features of the
    patch grid, so that image embeddings carry position from the first step and a box can select a region.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = SamModel(config)
    with torch.no_grad():
        model.shared_image_embedding.positional_embedding.normal_(0.0, position_scale)
        if model.vision_encoder.pos_embed is not None:
            grid = model.get_image_wide_positional_embeddings()[0].permute(1, 2, 0)  # (g, g, hidden)
            pos = model.vision_encoder.pos_embed
            pos.zero_()
            width = min(grid.shape[-1], pos.shape[-1])
            pos[0, : grid.shape[0], : grid.shape[1], :width] = grid[..., :width]
    return model


@dataclass
class ParameterCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} / total {self.total:,} ({100 * self.trainable / max(self.total, 1):.2f}%)"
        )


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Trainable and total parameter counts, each shared tensor counted once.

    For a peft model the LoRA adapters count, and the frozen originals that peft keeps beside its trained copies of
    `modules_to_save` do not: the total is the model's size plus the adapters'.
    """
    params = {id(p): p for n, p in model.named_parameters() if ".original_module." not in n}.values()
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad), total=sum(p.numel() for p in params)
    )


def freeze_modules(
    model: torch.nn.Module, freeze_vision_encoder: bool = True, freeze_prompt_encoder: bool = True
) -> None:
    """Switch off gradients of the frozen parts of a SAM-family model; the mask decoder stays trainable.

    The same flags freeze the same parts in every family member (`sam_hf.family`): `freeze_vision_encoder` the modules
    that compute the image embeddings (for SAM 2-style models also the decoder's projections of the high-resolution
    feature levels and the no-memory embedding, which transformers applies once per image), and
    `freeze_prompt_encoder` the prompt encoder with the image-wide positional embedding it shares with the image side.
    Decoder heads that no sam_hf loss reaches (SAM 2's object-score head) are always frozen.
    """
    member = family_of(model)
    model.requires_grad_(True)
    frozen = []
    for flag, names, label in (
        (freeze_vision_encoder, member.image_side, "image encoder"),
        (freeze_prompt_encoder, member.prompt_side, "prompt encoder"),
    ):
        if flag:
            for _, param in member.parts(model, names):
                param.requires_grad_(False)
            frozen.append(f"{label} ({', '.join(names)})")
    for _, param in member.parts(model, member.unused_outputs):
        param.requires_grad_(False)
    logger.info("%s: frozen %s. Parameters: %s", member.name, "; ".join(frozen) or "nothing", count_parameters(model))


def load_model_and_processor(
    model_name_or_path: str, revision: str = "main", token: str | None = None, cache_dir: str | None = None
) -> tuple[torch.nn.Module, ProcessorMixin]:
    """Load a SAM-family checkpoint and its processor from the Hub or a local directory.

    The family member (SAM, SAM-HQ, SAM 2.1, SAM 3 tracker, EdgeTAM) is read from the checkpoint's
    `config.json` (`model_type`), and its own model and processor classes load it (`sam_hf.family`).

    Args:
        model_name_or_path (`str`): a Hub id such as `facebook/sam-vit-base` or `facebook/sam2.1-hiera-tiny`, or a
            directory written by `save_pretrained` holding both the model and the processor.
        revision (`str`, *optional*, defaults to `"main"`): the Hub revision.
        token (`str`, *optional*): a Hub token; never logged.
        cache_dir (`str`, *optional*): where downloads are cached.
    """
    kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir}
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(
            f"Could not load a SAM-family model from --model_name_or_path={model_name_or_path!r}: expected a Hub id "
            "such as 'facebook/sam-vit-base' or a directory holding config.json and model weights."
        ) from err
    member = family_of(config)
    try:
        model = member.model_class.from_pretrained(model_name_or_path, **kwargs)
    except OSError as err:
        raise OSError(
            f"Could not load the {member.name} model weights of --model_name_or_path={model_name_or_path!r}: "
            f"expected a directory or Hub repo with config.json and model weights ({member.model_class.__name__})."
        ) from err
    declare_tied_weights_unsaved(model)
    processor = member.processor_class.from_pretrained(model_name_or_path, **kwargs)
    member.check_processor(processor, model.config)
    logger.info("Loaded %s (%s) from %s", member.name, type(model).__name__, model_name_or_path)
    return model, processor


def declare_tied_weights_unsaved(model: torch.nn.Module) -> torch.nn.Module:
    """Declare the model's tied copies (`prompt_encoder.shared_embedding.positional_embedding`, the same tensor as
    `shared_image_embedding.positional_embedding`) in `_keys_to_ignore_on_save`.

    `save_pretrained` writes a tied tensor once, under its source name, so every checkpoint lacks the copy. Loading a
    checkpoint back into the model with `load_state_dict` (the Trainer's `load_best_model_at_end` and
    `resume_from_checkpoint`) therefore reports it missing, and the Trainer warns "There were missing keys in the
    checkpoint model loaded" unless the missing keys are exactly the declared unsaved ones, in which case it re-ties
    them. What is saved and every value loaded stay as they were.
    """
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    if tied:
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | tied
    return model


def low_res_mask_side(config: PretrainedConfig) -> int:
    """Side of the square low-resolution masks the mask decoder predicts (4 x the embedding grid)."""
    return family_of(config).geometry(config).mask_side


def check_processor_matches_model(processor: ProcessorMixin, config: PretrainedConfig) -> None:
    """Raise if the processor would produce inputs or labels of another size than the model expects."""
    family_of(config).check_processor(processor, config)


def freeze_unused_decoder_outputs(model: torch.nn.Module, train_iou_head: bool = True) -> None:
    """Freeze the decoder parts that single-mask box training never reaches: the hypernetwork MLPs of the three
    multimask tokens, and the IoU head unless it is trained on the single-mask output (`train_iou_head`, the default:
    `SamTrainer` adds an IoU-prediction loss unless `iou_loss_weight` is 0).

    With `multimask_output=False` the multimask MLPs get no gradient; left trainable they would make
    DistributedDataParallel wait for gradients that never come. Freezing them also keeps them bit-identical to the
    base model.
    """
    member = family_of(model)
    model.mask_decoder.iou_prediction_head.requires_grad_(train_iou_head)
    for mlp in member.multimask_hypernetworks(model):
        mlp.requires_grad_(False)

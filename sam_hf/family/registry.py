"""The SAM family: what differs between SAM, SAM-HQ, SAM 2.1, the SAM 3 tracker and EdgeTAM, in one place.

Every part of sam_hf that touches a model (data, cache, trainer, predictor, evaluation, server, LoRA) asks the
`FamilyMember` of the model's `config.model_type` instead of branching on classes. A member says:

- which transformers classes load the checkpoint and its processor;
- the input geometry (`Geometry`): the square input side, the side of the low-resolution masks, and whether the
  processor keeps the aspect ratio and pads (SAM, SAM-HQ) or resizes to the square (SAM 2 and its descendants);
- which modules make the image embeddings (frozen by `--freeze_vision_encoder`, fingerprinted by the cache) and
  which make the prompt embeddings (`--freeze_prompt_encoder`);
- how the frozen image side's output is stored (one tensor or several feature levels) and handed back to the
  decoder, and the decoder parts that box-only single-mask training never reaches;
- the default LoRA targets, and a tiny configuration built in code for offline tests.

Adding a sixth member is one `FamilyMember(...)` entry in `FAMILY` (see `docs/model-family.md`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    EdgeTamModel,
    PretrainedConfig,
    Sam2Model,
    Sam2Processor,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
    SamHQModel,
    SamHQProcessor,
    SamModel,
    SamProcessor,
)

from .geometry import Geometry
from .tiny import (
    _padded_processor,
    _square_processor,
    _tiny_edgetam,
    _tiny_sam,
    _tiny_sam2,
    _tiny_sam3_tracker,
    _tiny_sam_hq,
)

logger = logging.getLogger(__name__)


Features = tuple[torch.Tensor, ...]


def as_levels(features: Any) -> Features:
    """Image features as a tuple of tensors, whether a model gave one tensor or several levels."""
    return tuple(features) if isinstance(features, (list, tuple)) else (features,)


def _single(model: torch.nn.Module, pixel_values: torch.Tensor) -> Features:
    return (model.get_image_embeddings(pixel_values),)


def _hq(model: torch.nn.Module, pixel_values: torch.Tensor) -> Features:
    embeddings, intermediate = model.get_image_embeddings(pixel_values)
    # The HQ decoder reads only the first global-attention layer's output; the others are not stored.
    return embeddings, intermediate[0]


def _levels(model: torch.nn.Module, pixel_values: torch.Tensor) -> Features:
    return tuple(model.get_image_embeddings(pixel_values))


def _single_inputs(features: Features) -> dict[str, Any]:
    return {"image_embeddings": features[0]}


def _hq_inputs(features: Features) -> dict[str, Any]:
    return {"image_embeddings": features[0], "intermediate_embeddings": [features[1]]}


def _levels_inputs(features: Features) -> dict[str, Any]:
    return {"image_embeddings": list(features)}


def _capture_single(vision_output: Any, model_output: Any) -> Features:
    return (vision_output[0],)


def _capture_hq(vision_output: Any, model_output: Any) -> Features:
    return vision_output[0], vision_output.intermediate_embeddings[0]


def _capture_levels(vision_output: Any, model_output: Any) -> Features:
    return tuple(model_output.image_embeddings)


@dataclass(frozen=True)
class FamilyMember:
    """What one SAM-family model type needs from sam_hf (see the module docstring).

    Args:
        model_type: `config.model_type` of its checkpoints.
        name: how people call it.
        model_class: the transformers model class that loads it.
        processor_class: the transformers processor class of its checkpoints.
        pads: see `Geometry.pads`.
        num_levels: how many tensors `encode` returns per image.
        image_side: dotted names of the modules and parameters that compute the image embeddings.
        encode: `(model, pixel_values) -> features`, the frozen image side's output as a tuple of tensors.
        decoder_inputs: `features -> keyword arguments` that give them back to the model's forward.
        capture: `(vision encoder output, model output) -> features` of a forward whose encoder learns (LoRA),
            so that a second decoder call reuses them.
        unused_outputs: decoder heads that no sam_hf loss reaches (SAM 2's object-score head), always frozen so
            that DistributedDataParallel does not wait for their gradients.
        lora_target_modules: default `--lora_target_modules`, matched as peft matches them.
        stability_selection: the decoder replaces an unstable single mask by its best multimask output outside
            training (`dynamic_multimask_via_stability`); sam_hf switches it off for fine-tuning, so that training,
            evaluation and the saved checkpoint use the one mask token that was trained.
        forward_kwargs: fixed keyword arguments of every forward.
        build_tiny_config: a small configuration, for offline tests and demos.
        build_tiny_processor: the processor matching a tiny configuration's `Geometry`.
    """

    model_type: str
    name: str
    model_class: type
    processor_class: type
    pads: bool
    num_levels: int
    image_side: tuple[str, ...]
    encode: Callable[[torch.nn.Module, torch.Tensor], Features]
    decoder_inputs: Callable[[Features], dict[str, Any]]
    capture: Callable[[Any, Any], Features]
    build_tiny_config: Callable[..., PretrainedConfig]
    build_tiny_processor: Callable[[Geometry], Any]
    prompt_side: tuple[str, ...] = ("prompt_encoder", "shared_image_embedding")
    unused_outputs: tuple[str, ...] = ()
    lora_target_modules: tuple[str, ...] = ()
    stability_selection: bool = False
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)

    # --- geometry -------------------------------------------------------------------------------------------------
    def geometry(self, config: PretrainedConfig) -> Geometry:
        prompt = config.prompt_encoder_config
        image_size, patch = _side(prompt.image_size), _side(prompt.patch_size)
        return Geometry(image_size, 4 * (image_size // patch), self.pads)

    def check_processor(self, processor: Any, config: PretrainedConfig) -> None:
        """Raise if the processor would produce inputs or labels of another size than the model expects."""
        expected, got = self.geometry(config), Geometry.of_processor(processor)
        if expected != got:
            raise ValueError(
                f"The processor does not match the {self.name} model config: the model takes {expected.image_size}-px "
                f"inputs and predicts {expected.mask_side}-px masks, the processor makes {got.image_size}-px inputs "
                f"and {got.mask_side}-px masks{' with padding' if got.pads else ''}."
            )

    def card_facts(self) -> dict[str, str]:
        """What the model card's usage snippet and tags need."""
        sizes = 'inputs["original_sizes"], inputs["reshaped_input_sizes"]' if self.pads else 'inputs["original_sizes"]'
        return {
            "family_name": self.name,
            "model_type": self.model_type,
            "model_class": self.model_class.__name__,
            "processor_class": self.processor_class.__name__,
            "post_process_sizes": sizes,
            "forward_kwargs": "".join(f", {k}={v!r}" for k, v in self.forward_kwargs.items()),
        }

    # --- parts ----------------------------------------------------------------------------------------------------
    def parts(self, model: torch.nn.Module, names: Sequence[str]) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """`(name, parameter)` of the named modules and parameters of `model`."""
        for name in names:
            target = _attr(model, name)
            if isinstance(target, torch.nn.Parameter):
                yield name, target
            elif target is not None:
                for sub, param in target.named_parameters():
                    yield f"{name}.{sub}", param

    def image_side_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors the image embeddings depend on (the cache's fingerprint covers them)."""
        state: dict[str, torch.Tensor] = {}
        for name in self.image_side:
            target = _attr(model, name)
            if isinstance(target, torch.Tensor):
                state[name] = target
            elif target is not None:
                state.update({f"{name}.{k}": v for k, v in target.state_dict().items()})
        return state

    def check_features(self, features: Features, config: PretrainedConfig) -> None:
        """Raise unless `features` (with a batch dimension) look like this model's image features."""
        hidden = config.mask_decoder_config.hidden_size
        main = features[-1] if self.num_levels > 2 else features[0]  # the level the decoder's attention reads
        if len(features) != self.num_levels or any(f.dim() != 4 for f in features) or main.shape[1] != hidden:
            raise ValueError(
                f"Expected the {self.num_levels} image feature level(s) of this {self.name} model, the one its "
                f"decoder attends to with {hidden} channels, each of shape (C, h, w) or (1, C, h, w); got shapes "
                f"{[tuple(f.shape) for f in features]}."
            )

    def vision_encoder(self, model: torch.nn.Module) -> torch.nn.Module:
        return _attr(model, self.image_side[0])

    def multimask_hypernetworks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The hypernetwork MLPs of the multimask tokens (1..3), which only multimask outputs reach."""
        decoder = model.mask_decoder
        n = decoder.num_multimask_outputs if hasattr(decoder, "num_multimask_outputs") else 3
        return list(decoder.output_hypernetworks_mlps[1 : 1 + n])

    def prepare_for_training(self, model: torch.nn.Module) -> None:
        """Make evaluation use the mask the training loss reaches (see `stability_selection`)."""
        if self.stability_selection and model.mask_decoder.dynamic_multimask_via_stability:
            model.mask_decoder.dynamic_multimask_via_stability = False
            model.config.mask_decoder_config.dynamic_multimask_via_stability = False
            logger.info(
                "%s: dynamic multimask selection off (mask_decoder_config.dynamic_multimask_via_stability=False), "
                "so that evaluation and the saved model use the single-mask output that training tunes.",
                self.name,
            )


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _attr(model: torch.nn.Module, dotted: str) -> Any:
    target: Any = model
    for part in dotted.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


# What SAM 2, the SAM 3 tracker and EdgeTAM share: a plain resize to the square, three feature levels, and an image
# side that includes the decoder's projections of the two high-resolution levels and the no-memory embedding
# (transformers applies them once per image in `get_image_features`, so a cached feature is what the model computes).
_SAM2_STYLE: dict[str, Any] = {
    "pads": False,
    "num_levels": 3,
    "image_side": ("vision_encoder", "mask_decoder.conv_s0", "mask_decoder.conv_s1", "no_memory_embedding"),
    "encode": _levels,
    "decoder_inputs": _levels_inputs,
    "capture": _capture_levels,
    "unused_outputs": ("mask_decoder.pred_obj_score_head",),
    "stability_selection": True,
}


FAMILY: dict[str, FamilyMember] = {
    m.model_type: m
    for m in (
        FamilyMember(
            model_type="sam",
            name="SAM",
            model_class=SamModel,
            processor_class=SamProcessor,
            pads=True,
            num_levels=1,
            image_side=("vision_encoder",),
            encode=_single,
            decoder_inputs=_single_inputs,
            capture=_capture_single,
            # Each SamVisionAttention has one fused `qkv` linear; the decoder's attention uses q_proj/k_proj/v_proj.
            lora_target_modules=("qkv",),
            build_tiny_config=_tiny_sam,
            build_tiny_processor=_padded_processor(SamProcessor),
        ),
        FamilyMember(
            model_type="sam_hq",
            name="SAM-HQ",
            model_class=SamHQModel,
            processor_class=SamHQProcessor,
            pads=True,
            num_levels=2,
            image_side=("vision_encoder",),
            encode=_hq,
            decoder_inputs=_hq_inputs,
            capture=_capture_hq,
            lora_target_modules=("qkv",),
            # SAM's mask plus the HQ token's (hq_token_only=False), as SAM-HQ predicts by default.
            forward_kwargs={"hq_token_only": False},
            build_tiny_config=_tiny_sam_hq,
            build_tiny_processor=_padded_processor(SamHQProcessor),
        ),
        FamilyMember(
            model_type="sam2",
            name="SAM 2.1",
            model_class=Sam2Model,
            processor_class=Sam2Processor,
            **_SAM2_STYLE,
            # Hiera's MultiScaleAttention has one fused `qkv` linear.
            lora_target_modules=("qkv",),
            build_tiny_config=_tiny_sam2,
            build_tiny_processor=_square_processor(Sam2Processor),
        ),
        FamilyMember(
            model_type="sam3_tracker",
            name="SAM 3 tracker",
            model_class=Sam3TrackerModel,
            processor_class=Sam3TrackerProcessor,
            **_SAM2_STYLE,
            # The SAM 3 ViT's attention projections; "attention." keeps the decoder's self_attn/cross_attn out.
            lora_target_modules=("attention.q_proj", "attention.v_proj"),
            build_tiny_config=_tiny_sam3_tracker,
            build_tiny_processor=_square_processor(Sam3TrackerProcessor),
        ),
        FamilyMember(
            model_type="edgetam",
            name="EdgeTAM",
            model_class=EdgeTamModel,
            processor_class=Sam2Processor,
            **_SAM2_STYLE,
            # RepViT is convolutional: no attention linears to adapt (give --lora_target_modules to choose some).
            lora_target_modules=(),
            build_tiny_config=_tiny_edgetam,
            build_tiny_processor=_square_processor(Sam2Processor),
        ),
    )
}


# Checkpoints of another model type whose promptable part a member's class loads: the full SAM 3 checkpoint
# (`facebook/sam3`, model_type "sam3") holds the SAM 3 tracker, which `Sam3TrackerModel.from_pretrained` reads.
ALIASES = {"sam3": "sam3_tracker"}


def family_of(model_or_config: Any) -> FamilyMember:
    """The `FamilyMember` of a model, a config, or a `model_type` string (peft models are looked through)."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in FAMILY:
        raise ValueError(
            f"Unsupported model type {model_type!r}: sam_hf fine-tunes "
            + ", ".join(f"{m.name} ({t!r})" for t, m in FAMILY.items())
            + "."
        )
    return FAMILY[model_type]


def tiny_config(model_type: str = "sam", **kwargs: Any) -> PretrainedConfig:
    """A small configuration of a family member, built in code (offline tests and examples)."""
    return family_of(model_type).build_tiny_config(**kwargs)


def tiny_processor(config: PretrainedConfig) -> Any:
    """The processor matching `tiny_config(...)` (input side and low-resolution mask side)."""
    member = family_of(config)
    return member.build_tiny_processor(member.geometry(config))

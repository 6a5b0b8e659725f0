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
import torch.nn.functional as F
from transformers import (
    EdgeTamConfig,
    EdgeTamModel,
    PretrainedConfig,
    Sam2Config,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2Processor,
    Sam3TrackerConfig,
    Sam3TrackerModel,
    Sam3TrackerProcessor,
    SamHQConfig,
    SamHQModel,
    SamHQProcessor,
    SamImageProcessorPil,
    SamModel,
    SamProcessor,
)

logger = logging.getLogger(__name__)

__all__ = ["FAMILY", "FamilyMember", "Geometry", "as_levels", "family_of", "tiny_config", "tiny_processor"]

Features = tuple[torch.Tensor, ...]


def as_levels(features: Any) -> Features:
    """Image features as a tuple of tensors, whether a model gave one tensor or several levels."""
    return tuple(features) if isinstance(features, (list, tuple)) else (features,)


@dataclass(frozen=True)
class Geometry:
    """Where an image's pixels land in the model's input and in its low-resolution masks.

    Args:
        image_size: side of the square model input.
        mask_side: side of the square low-resolution masks the decoder predicts.
        pads: `True` when the processor resizes the longest side to `image_size` and pads bottom/right (SAM);
            `False` when it resizes both sides to `image_size` (SAM 2), stretching non-square images, with labels
            stretched the same way.
    """

    image_size: int
    mask_side: int
    pads: bool

    def resized(self, height: int, width: int, side: int | None = None) -> tuple[int, int]:
        """The `(H, W)` an image of `(height, width)` takes inside a square frame of `side` (default: the input)."""
        side = self.image_size if side is None else side
        if not self.pads:
            return side, side
        scale = side / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def label_shape(self, height: int, width: int) -> tuple[int, int]:
        """The `(H, W)` of the image inside the low-resolution mask frame; the rest of the frame is padding."""
        return self.resized(height, width, self.mask_side)

    def upscale(
        self, logits: torch.Tensor, original_size: Sequence[int], reshaped_size: Sequence[int]
    ) -> torch.Tensor:
        """Low-resolution logits `(N, m, m)` -> logits `(N, H, W)` at the original resolution, as the family's
        processor post-processes masks: through the padded input frame and its crop (SAM), or straight to the
        original size (SAM 2)."""
        x = logits[:, None].float()
        if self.pads:
            x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
            x = x[..., : int(reshaped_size[0]), : int(reshaped_size[1])]
        x = F.interpolate(x, tuple(int(v) for v in original_size), mode="bilinear", align_corners=False)
        return x[:, 0]

    @classmethod
    def of_processor(cls, processor: Any) -> Geometry:
        """The geometry a processor (or image processor) produces, read from its configuration."""
        ip = getattr(processor, "image_processor", processor)
        if getattr(ip, "mask_pad_size", None):
            sides = {
                "size": ip.size["longest_edge"],
                "pad_size": (ip.pad_size["height"], ip.pad_size["width"]),
                "mask_size": ip.mask_size["longest_edge"],
                "mask_pad_size": (ip.mask_pad_size["height"], ip.mask_pad_size["width"]),
            }
            if (sides["size"],) * 2 != sides["pad_size"] or (sides["mask_size"],) * 2 != sides["mask_pad_size"]:
                raise ValueError(
                    f"{type(ip).__name__} resizes the longest side to `size` and pads to the square `pad_size`, and "
                    f"the same for masks: they must agree, got {sides}."
                )
            return cls(int(ip.pad_size["height"]), int(ip.mask_pad_size["height"]), pads=True)
        if ip.size["height"] != ip.size["width"] or ip.mask_size["height"] != ip.mask_size["width"]:
            raise ValueError(
                f"{type(ip).__name__} must resize to a square: got size {dict(ip.size)}, "
                f"mask_size {dict(ip.mask_size)}."
            )
        return cls(int(ip.size["height"]), int(ip.mask_size["height"]), pads=False)


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
        model_class / processor_class: the transformers classes that load it.
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
        build_tiny_config / build_tiny_processor: a small configuration and its matching processor, for offline
            tests and demos.
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
    build_tiny_processor: Callable[[PretrainedConfig], Any]
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


# --- tiny configurations, for offline tests -----------------------------------------------------------------------


def _tiny_sam(image_size: int = 128, **kwargs: Any) -> PretrainedConfig:
    from .modeling import tiny_sam_config

    return tiny_sam_config(image_size=image_size, **kwargs)


def _tiny_sam_hq(image_size: int = 128) -> PretrainedConfig:
    base = _tiny_sam(image_size).to_dict()
    decoder = {**base["mask_decoder_config"], "vit_dim": base["vision_config"]["hidden_size"]}
    return SamHQConfig(
        vision_config=base["vision_config"],
        prompt_encoder_config=base["prompt_encoder_config"],
        mask_decoder_config=decoder,
    )


def _tiny_decoder(hidden: int) -> dict[str, Any]:
    return {"hidden_size": hidden, "mlp_dim": 4 * hidden, "num_attention_heads": 4, "iou_head_hidden_dim": hidden}


def _feature_sizes(grid: int) -> list[list[int]]:
    return [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]


def _tiny_sam2(image_size: int = 128, hidden: int = 32) -> PretrainedConfig:
    grid = image_size // 16
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 16,
        "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 1, 2, 2],
        # A global block may not open a stage (its query pooling needs a window); block 4 is stage 2's second.
        "blocks_per_stage": [1, 2, 2, 1],
        "global_attention_blocks": [4],
        "window_size_per_stage": [4, 4, 4, 4],
        "image_size": [image_size, image_size],
        "window_positional_embedding_background_size": [4, 4],
    }
    vision = {
        "backbone_config": backbone,
        "backbone_channel_list": [128, 64, 32, 16],
        "backbone_feature_sizes": _feature_sizes(grid),
        "fpn_hidden_size": hidden,
    }
    prompt = {"hidden_size": hidden, "image_size": image_size, "patch_size": 16}
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=_tiny_decoder(hidden))


def _tiny_sam3_tracker(image_size: int = 112, hidden: int = 32) -> PretrainedConfig:
    grid = image_size // 14
    vit = {
        "model_type": "sam3_vit_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 14,
        "window_size": 4,
        "global_attn_indexes": [1],
        "pretrain_image_size": image_size,
    }
    vision = {
        "model_type": "sam3_vision_model",
        "backbone_config": vit,
        "fpn_hidden_size": hidden,
        "backbone_feature_sizes": _feature_sizes(grid),
        "scale_factors": [4.0, 2.0, 1.0, 0.5],
    }
    prompt = {"hidden_size": hidden, "image_size": image_size, "patch_size": 14}
    return Sam3TrackerConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=_tiny_decoder(hidden)
    )


def _tiny_edgetam(image_size: int = 128, hidden: int = 32) -> PretrainedConfig:
    from transformers import TimmWrapperConfig

    # EdgeTAM's image encoder is a timm RepViT (`pip install timm`); m0.9 is the smallest.
    backbone = TimmWrapperConfig(
        architecture="repvit_m0_9",
        model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]},
        num_labels=0,
    )
    vision = {
        "backbone_config": backbone,
        "backbone_channel_list": [384, 192, 96, 48],
        "backbone_feature_sizes": _feature_sizes(image_size // 16),
        "fpn_hidden_size": hidden,
    }
    prompt = {"hidden_size": hidden, "image_size": image_size, "patch_size": 16}
    return EdgeTamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=_tiny_decoder(hidden))


def _padded_processor(processor_class: type) -> Callable[[PretrainedConfig], Any]:
    def build(config: PretrainedConfig) -> Any:
        g = FAMILY[config.model_type].geometry(config)
        image_processor = SamImageProcessorPil(
            size={"longest_edge": g.image_size},
            pad_size={"height": g.image_size, "width": g.image_size},
            mask_size={"longest_edge": g.mask_side},
            mask_pad_size={"height": g.mask_side, "width": g.mask_side},
        )
        return processor_class(image_processor=image_processor)

    return build


def _square_processor(processor_class: type) -> Callable[[PretrainedConfig], Any]:
    def build(config: PretrainedConfig) -> Any:
        g = FAMILY[config.model_type].geometry(config)
        image_processor = Sam2ImageProcessor(
            size={"height": g.image_size, "width": g.image_size},
            mask_size={"height": g.mask_side, "width": g.mask_side},
        )
        return processor_class(image_processor=image_processor)

    return build


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
    return family_of(config).build_tiny_processor(config)

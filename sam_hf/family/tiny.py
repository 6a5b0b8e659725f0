"""Tiny configurations and processors of every family member, built in code for offline tests and examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import (
    EdgeTamConfig,
    PretrainedConfig,
    Sam2Config,
    Sam2ImageProcessor,
    Sam3TrackerConfig,
    SamConfig,
    SamHQConfig,
    SamImageProcessorPil,
    SamProcessor,
)

from .geometry import Geometry


def tiny_sam_config(
    image_size: int = 256,
    patch_size: int = 16,
    vision_hidden_size: int = 96,
    vision_layers: int = 4,
    hidden_size: int = 64,
    window_size: int = 4,
) -> SamConfig:
    """A small `SamConfig` whose sub-configs agree with each other, for CPU demos and tests.

    The constraints SAM places on its sub-configs are all derived here from the arguments:

    - vision `output_channels` == prompt-encoder `hidden_size` == mask-decoder `hidden_size` (`hidden_size`);
    - vision `num_pos_feats` == `hidden_size // 2`;
    - prompt-encoder `image_size` / `patch_size` == the vision encoder's.

    The low-resolution masks the decoder predicts are `4 * image_size // patch_size` pixels square.

    Args:
        image_size (`int`, *optional*, defaults to 256): side of the square, padded model input.
        patch_size (`int`, *optional*, defaults to 16): ViT patch size; the grid is
            `image_size // patch_size`.
        vision_hidden_size (`int`, *optional*, defaults to 96): width of the ViT encoder.
        vision_layers (`int`, *optional*, defaults to 4): depth of the ViT encoder; the last layer
            uses global attention.
        hidden_size (`int`, *optional*, defaults to 64): width of the image embedding, prompt encoder and mask decoder.
        window_size (`int`, *optional*, defaults to 4): windowed-attention size of the non-global ViT layers.

    Example:

    ```python
    >>> from transformers import SamModel
    >>> model = SamModel(tiny_sam_config())
    >>> model.config.vision_config.output_channels == model.config.mask_decoder_config.hidden_size
    True
    ```
    """
    if hidden_size % 2:
        raise ValueError(f"`hidden_size` must be even (num_pos_feats is half of it), got {hidden_size}.")
    if image_size % patch_size:
        raise ValueError(f"`image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size}).")
    vision = {
        "hidden_size": vision_hidden_size,
        "output_channels": hidden_size,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        "window_size": window_size,
        "global_attn_indexes": [vision_layers // 2 - 1, vision_layers - 1] if vision_layers > 1 else [0],
        "num_pos_feats": hidden_size // 2,
        "mlp_dim": 2 * vision_hidden_size,
        # SamVisionConfig defaults to initializer_range=1e-10, which suits loading pretrained weights but leaves a
        # freshly initialised encoder dead (its output does not depend on the image). Train-from-scratch needs 0.02.
        "initializer_range": 0.02,
    }
    prompt = {"hidden_size": hidden_size, "image_size": image_size, "patch_size": patch_size}
    decoder = {
        "hidden_size": hidden_size,
        "mlp_dim": 4 * hidden_size,
        "num_attention_heads": 4,
        "iou_head_hidden_dim": hidden_size,
    }
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def tiny_sam_processor(config: SamConfig) -> SamProcessor:
    """A `SamProcessor` whose image and mask sizes match `config` (input side and low-resolution mask side)."""
    image_size = config.vision_config.image_size
    geometry = Geometry(image_size, mask_side=4 * (image_size // config.vision_config.patch_size), pads=True)
    return _padded_processor(SamProcessor)(geometry)


def _tiny_sam(image_size: int = 128, **kwargs: Any) -> PretrainedConfig:

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


def _padded_processor(processor_class: type) -> Callable[[Geometry], Any]:
    def build(g: Geometry) -> Any:
        image_processor = SamImageProcessorPil(
            size={"longest_edge": g.image_size},
            pad_size={"height": g.image_size, "width": g.image_size},
            mask_size={"longest_edge": g.mask_side},
            mask_pad_size={"height": g.mask_side, "width": g.mask_side},
        )
        return processor_class(image_processor=image_processor)

    return build


def _square_processor(processor_class: type) -> Callable[[Geometry], Any]:
    def build(g: Geometry) -> Any:
        image_processor = Sam2ImageProcessor(
            size={"height": g.image_size, "width": g.image_size},
            mask_size={"height": g.mask_side, "width": g.mask_side},
        )
        return processor_class(image_processor=image_processor)

    return build

"""The SAM family: the registry of members (SAM, SAM-HQ, SAM 2.1, SAM 3 tracker, EdgeTAM), tiny configs,
loading, freezing and LoRA adapters."""

from __future__ import annotations

from .geometry import Geometry
from .lora import (
    ADAPTER_DIR,
    LORA_TARGET_MODULES,
    add_lora_adapters,
    default_lora_target_modules,
    is_lora_model,
    merged_model,
    require_peft,
    save_lora_model,
)
from .modeling import (
    ParameterCount,
    count_parameters,
    declare_tied_weights_unsaved,
    freeze_modules,
    load_model_and_processor,
)
from .registry import FAMILY, FamilyMember, as_levels, family_of, tiny_config, tiny_processor
from .tiny import tiny_sam_config, tiny_sam_processor

__all__ = [
    "ADAPTER_DIR",
    "FAMILY",
    "FamilyMember",
    "Geometry",
    "LORA_TARGET_MODULES",
    "ParameterCount",
    "add_lora_adapters",
    "as_levels",
    "count_parameters",
    "declare_tied_weights_unsaved",
    "default_lora_target_modules",
    "family_of",
    "freeze_modules",
    "is_lora_model",
    "load_model_and_processor",
    "merged_model",
    "require_peft",
    "save_lora_model",
    "tiny_config",
    "tiny_processor",
    "tiny_sam_config",
    "tiny_sam_processor",
]

"""LoRA adapters on SAM's image encoder, with peft (`pip install sam_hf[lora]`).

The base encoder stays frozen; low-rank adapters on its attention projections learn, while the parts of the model
that train in full (the mask decoder, and the prompt encoder unless `--freeze_prompt_encoder`) are peft
`modules_to_save`, so that the saved adapter carries everything a run changed. peft is imported only here, and only
when adapters are asked for: sam_hf trains and loads checkpoints without it.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..core.env import INSTALL_HINT
from .registry import FAMILY

logger = logging.getLogger(__name__)


# Default adapter targets per `config.model_type`, as peft matches `target_modules` (a module whose dotted name is the
# entry or ends with "." + the entry): the image encoder's attention projections, named per family member in
# `sam_hf.family` (SAM's fused `qkv`, SAM 3's `attention.q_proj` / `attention.v_proj`; the mask decoder's attention
# layers are named otherwise, so they keep training in full).
LORA_TARGET_MODULES: dict[str, list[str]] = {t: list(m.lora_target_modules) for t, m in FAMILY.items()}


# Subfolder of the output dir that receives the adapter (adapter_model.safetensors + adapter_config.json).
ADAPTER_DIR = "adapter"


# Weight files a plain checkpoint consists of, removed from the output dir when only the adapter is kept.
_PLAIN_CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def require_peft():
    """Import peft, or say how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            f"LoRA adapters (--lora_rank) need the peft package, which is not installed: run `{INSTALL_HINT}` "
            "(or `pip install 'peft>=0.13'`), or train without --lora_rank."
        ) from err
    return peft


def is_lora_model(model: Any) -> bool:
    """Whether `model` is a peft `PeftModel` (never imports peft)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def default_lora_target_modules(model_type: str) -> list[str]:
    """The default adapter targets of a model type (`LORA_TARGET_MODULES`)."""
    if not LORA_TARGET_MODULES.get(model_type):
        known = ", ".join(t for t, v in LORA_TARGET_MODULES.items() if v)
        raise ValueError(
            f"No default LoRA targets for model type {model_type!r} (defaults exist for {known}): pass "
            "--lora_target_modules with the names of its image encoder's linear layers."
        )
    return list(LORA_TARGET_MODULES[model_type])


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _is_frozen(module: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def resolve_target_modules(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Dotted names of the modules `targets` select, as peft matches them; each must be a frozen `nn.Linear`."""
    matched, problems = [], []
    for target in targets:
        hits = [(n, m) for n, m in model.named_modules() if _matches(n, target)]
        if not hits:
            problems.append(f"{target!r} matches no module")
        for name, module in hits:
            if not isinstance(module, torch.nn.Linear):
                problems.append(f"{target!r} matches {name}, a {type(module).__name__} (not an nn.Linear)")
            elif not _is_frozen(module):
                problems.append(
                    f"{target!r} matches {name}, which trains in full (adapters go on frozen layers: the image "
                    "encoder, or the prompt encoder with --freeze_prompt_encoder)"
                )
            else:
                matched.append(name)
    if problems:
        vision = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "vision" in n
            }
        )
        raise ValueError(
            f"--lora_target_modules: {'; '.join(problems)}. The image encoder's linear layers are named "
            f"{', '.join(vision) or 'nothing'}."
        )
    return sorted(set(matched))


def trained_modules(model: torch.nn.Module) -> list[str]:
    """The fewest modules that cover every trainable parameter and only trainable ones: peft's `modules_to_save`.

    peft makes each of them trainable in full, so a module mixing frozen and trainable parameters (the mask decoder
    with its IoU head frozen) is replaced by its fully trainable children, and the frozen ones stay the base model's.
    """
    names: list[str] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if not params or not any(p.requires_grad for p in params):
            return
        # peft wraps modules that run (not ModuleList / ModuleDict containers): a container's children are named.
        container = isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict))
        if prefix and not container and all(p.requires_grad for p in params):
            names.append(prefix)
            return
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            raise ValueError(
                f"{prefix or 'the model'} holds trainable parameters of its own ({', '.join(own)}) beside frozen "
                "ones; peft cannot train them without its frozen parts."
            )
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return names


def _active(module: torch.nn.Module) -> torch.nn.Module:
    """The module a peft `ModulesToSaveWrapper` runs (its trainable copy); any other module as it is."""
    from peft.utils import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        return module.modules_to_save[module.active_adapter]
    return module


def _retie(peft_model: torch.nn.Module, base: torch.nn.Module) -> None:
    """Tie again what `modules_to_save` copied apart.

    SAM ties `prompt_encoder.shared_embedding.positional_embedding` to `shared_image_embedding.positional_embedding`.
    With the prompt encoder trained, peft copies both modules separately; without this the two copies would drift
    apart during training and the merged checkpoint (which keeps one of them) would not compute what was trained.
    """
    for target, source in (getattr(base, "all_tied_weights_keys", None) or {}).items():

        def resolve(dotted: str):
            owner = peft_model.get_base_model()
            *path, leaf = dotted.split(".")
            for part in path:
                owner = _active(getattr(owner, part))
            return owner, leaf

        (t_owner, t_leaf), (s_owner, s_leaf) = resolve(target), resolve(source)
        source_param = getattr(s_owner, s_leaf)
        if getattr(t_owner, t_leaf) is not source_param:
            setattr(t_owner, t_leaf, source_param)


def add_lora_adapters(
    model: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> torch.nn.Module:
    """Wrap a SAM model, frozen as it should train, into a peft `PeftModel` with LoRA adapters.

    Call it after `freeze_modules` (and `freeze_unused_decoder_outputs`): the adapters go on the frozen `nn.Linear`
    layers `target_modules` names (default: `LORA_TARGET_MODULES[model.config.model_type]`, the image encoder's
    fused `qkv` attention projections), whose base weights stay frozen; every module that was trainable before (the
    mask decoder, the prompt encoder unless frozen) keeps training in full as a peft `modules_to_save`, and what was
    frozen stays frozen.

    Args:
        model (`SamModel`): the model, with its modules frozen or not as they should train.
        rank (`int`): LoRA rank `r`.
        alpha (`float`, *optional*): LoRA alpha; defaults to `rank` (the adapter's update is scaled by
            `alpha / rank`, so by 1).
        dropout (`float`, *optional*, defaults to 0.0): dropout on the adapter's input.
        target_modules (`list[str]`, *optional*): names of the linear layers to adapt, matched as peft matches
            them (the full dotted name, or its end after a dot).
    """
    peft = require_peft()
    if rank < 1:
        raise ValueError(f"--lora_rank must be >= 1, got {rank}.")
    targets = list(target_modules) if target_modules else default_lora_target_modules(model.config.model_type)
    adapted = resolve_target_modules(model, targets)
    to_save = trained_modules(model)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=to_save,
        bias="none",
    )
    peft_model = peft.get_peft_model(model, config)
    _retie(peft_model, model)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    logger.info(
        "LoRA adapters (rank %d, alpha %g, dropout %g) on %d modules matching %s (%s LoRA parameters); trained in "
        "full: %s.",
        rank,
        config.lora_alpha,
        dropout,
        len(adapted),
        targets,
        f"{lora_params:,}",
        ", ".join(to_save) or "nothing else",
    )
    return peft_model


def lora_card_info(peft_model: torch.nn.Module, merged: bool) -> dict[str, Any]:
    """What the model card says about the adapter."""
    config = peft_model.peft_config[peft_model.active_adapter]
    targets = config.target_modules
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": ", ".join(f"`{t}`" for t in sorted(targets)) if not isinstance(targets, str) else targets,
        "num_modules": sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A")),
        "parameters": f"{sum(p.numel() for n, p in peft_model.named_parameters() if 'lora_' in n):,}",
        "modules_to_save": ", ".join(f"`{m}`" for m in config.modules_to_save or []),
        "merged": merged,
        "adapter_dir": ADAPTER_DIR,
        "base_model_name_or_path": config.base_model_name_or_path,
    }


def merged_model(peft_model: torch.nn.Module) -> torch.nn.Module:
    """A plain model with the adapters merged into its weights; `peft_model` itself is left as it is."""
    return copy.deepcopy(peft_model).merge_and_unload()


def save_lora_model(peft_model: torch.nn.Module, output_dir: str | os.PathLike, merge: bool = True) -> list[Path]:
    """Write the adapter to `output_dir/adapter/` and, with `merge`, the merged plain checkpoint to `output_dir`.

    The adapter (`adapter_model.safetensors` + `adapter_config.json`, which names the base model) loads with
    `peft.PeftModel.from_pretrained(base, output_dir / "adapter")`. The merged checkpoint (`model.safetensors` +
    `config.json`) loads with the family's class (`SamModel.from_pretrained(output_dir)` for SAM) and
    `pipeline("mask-generation")`, without peft.
    Without `merge`, a plain checkpoint left in `output_dir` by an earlier run is removed, so that the directory
    cannot hold weights other than this run's.
    """
    out = Path(output_dir)
    adapter_dir = out / ADAPTER_DIR
    peft_model.save_pretrained(adapter_dir)
    # peft writes an empty template card beside the adapter; the run's card in output_dir describes the adapter.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    written = [adapter_dir]
    if merge:
        merged_model(peft_model).save_pretrained(out)
        written.append(out / "model.safetensors")
    else:
        for name in _PLAIN_CHECKPOINT_FILES:
            (out / name).unlink(missing_ok=True)
        for shard in out.glob("model-*-of-*.safetensors"):
            shard.unlink()
    logger.info(
        "Saved the LoRA adapter to %s%s.",
        adapter_dir,
        f" and the merged model to {out}"
        if merge
        else f" (--lora_merge false: load it with peft.PeftModel.from_pretrained("
        f"{type(peft_model.get_base_model()).__name__}.from_pretrained(base), '{adapter_dir}'))",
    )
    return written

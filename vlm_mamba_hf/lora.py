"""LoRA through PEFT: default targets that every compute path honours, and apply/merge helpers.

Every projection in VLMamba's mixers is called as a module (never through its raw weight), so LoRA
adapters on in_proj, x_proj, dt_proj and out_proj take effect on every path, CPU or CUDA.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

TEXT_LORA_MODULES = ("in_proj", "x_proj", "dt_proj", "out_proj")
VISION_LORA_MODULES = ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")
BRIDGER_MODULE = "multi_modal_projector"


def default_target_modules(include_vision: bool = False) -> str:
    """A regex for PEFT's `target_modules`: the language model's mixer projections (and the vision tower's)."""
    text = (
        r"(?:.*\.)?(?:language_model|backbone)\.layers\.\d+\.mixer\.(?:" + "|".join(TEXT_LORA_MODULES) + ")"
    )
    if not include_vision:
        return text
    vision = r"(?:.*\.)?vision_tower\.layers\.\d+\.mixer\.(?:" + "|".join(VISION_LORA_MODULES) + ")"
    return f"(?:{text})|(?:{vision})"


def default_lora_config(
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    include_vision: bool = False,
    train_bridger: bool = True,
    **kwargs,
) -> LoraConfig:
    """PEFT LoraConfig for VLMamba: LoRA on in_proj/x_proj/dt_proj/out_proj, the bridger fully trained."""
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=default_target_modules(include_vision),
        modules_to_save=[BRIDGER_MODULE] if train_bridger else None,
        **kwargs,
    )


def apply_lora(model: torch.nn.Module, config: LoraConfig | None = None) -> PeftModel:
    """Wrap `model` with PEFT LoRA adapters (default config when none is given); only adapters train."""
    return get_peft_model(model, config if config is not None else default_lora_config())


def merge_lora(model: PeftModel) -> torch.nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model."""
    return model.merge_and_unload()


__all__ = [
    "TEXT_LORA_MODULES",
    "VISION_LORA_MODULES",
    "default_target_modules",
    "default_lora_config",
    "apply_lora",
    "merge_lora",
]

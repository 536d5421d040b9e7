"""LoRA through PEFT: default targets that every compute path honours, and apply/merge helpers.

Every projection in VLMamba's mixers is called as a module (never through its raw weight), so LoRA
adapters on in_proj, x_proj, dt_proj and out_proj take effect on every path, CPU or CUDA.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open

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


def _adapter_shapes(adapter_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"No adapter_model.safetensors in {adapter_dir}: save adapters with `peft_model.save_pretrained(dir)`."
        )
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def check_adapter_fits(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Raise a ValueError naming each mismatch when the adapter at `adapter_dir` was saved for another base model.

    Checks every LoRA matrix against the in/out features of the module it adapts, every saved module
    (`modules_to_save`) against the model's parameter, and that each module the adapter's
    `target_modules` selects in this model has adapter weights (a deeper model would otherwise run some
    layers without their adapter, silently).
    """
    prefix = "base_model.model."
    shapes = _adapter_shapes(adapter_dir)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    problems: list[str] = []
    adapted: set[str] = set()
    for key, shape in shapes.items():
        name = key.removeprefix(prefix)
        if ".lora_A." in name or ".lora_B." in name:
            module_name = name.split(".lora_")[0]
            adapted.add(module_name)
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                problems.append(f"{module_name}: adapted by the adapter, absent from this model")
                continue
            base = getattr(module, "base_layer", module)
            if ".lora_A." in name and shape[1] != base.in_features:
                problems.append(f"{module_name}: adapter in_features {shape[1]}, model {base.in_features}")
            if ".lora_B." in name and shape[0] != base.out_features:
                problems.append(f"{module_name}: adapter out_features {shape[0]}, model {base.out_features}")
            continue
        param_name = name.replace(".modules_to_save.default.", ".")
        try:
            param = model.get_parameter(param_name)
        except AttributeError:
            problems.append(f"{param_name}: saved by the adapter, absent from this model")
            continue
        if tuple(param.shape) != shape:
            problems.append(f"{param_name}: adapter shape {shape}, model {tuple(param.shape)}")
    pattern = config.target_modules
    if isinstance(pattern, str):
        missing = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and re.fullmatch(pattern, name) and name not in adapted
        ]
        problems += [
            f"{name}: a target module of this model that the adapter has no weights for" for name in missing
        ]
    if problems:
        shown = "\n  ".join(problems[:12]) + ("\n  ..." if len(problems) > 12 else "")
        base_name = config.base_model_name_or_path or "(unrecorded)"
        raise ValueError(
            f"The LoRA adapter at {adapter_dir} was saved for a different base model (adapter base: {base_name}; "
            f"this model: {type(model).__name__} {getattr(model, 'name_or_path', '') or ''}). "
            f"{len(problems)} mismatch(es):\n  {shown}\nLoad it onto the base model it was trained from."
        )


def load_lora_adapter(
    model: torch.nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False
) -> PeftModel:
    """Attach the adapter saved at `adapter_dir` (adapter_model.safetensors) to `model`, after `check_adapter_fits`."""
    check_adapter_fits(model, adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)


__all__ = [
    "TEXT_LORA_MODULES",
    "VISION_LORA_MODULES",
    "default_target_modules",
    "default_lora_config",
    "apply_lora",
    "merge_lora",
    "check_adapter_fits",
    "load_lora_adapter",
]

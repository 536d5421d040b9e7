"""LoRA through PEFT: default targets that every compute path honours, and apply/merge helpers.

Every projection in VLMamba's mixers is called as a module (never through its raw weight), so LoRA
adapters on them take effect on every path, CPU or CUDA. The default targets follow the mixer kind:
a Mamba-1 mixer has in_proj, x_proj, dt_proj and out_proj; a Mamba-2 (SSD) mixer only in_proj and
out_proj (its conv1d is a depthwise Conv1d and dt, B, C come out of in_proj), so LoRA on in_proj
adapts dt, B, C, x and the gate together.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import PreTrainedConfig

TEXT_LORA_MODULES = ("in_proj", "x_proj", "dt_proj", "out_proj")
VISION_LORA_MODULES = ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")
MAMBA2_LORA_MODULES = ("in_proj", "out_proj")  # text and vision: the bidirectional mixer shares both
BRIDGER_MODULE = "multi_modal_projector"
# PEFT refuses LoRA on these whenever `model.config.model_type` is "mamba" or "mamba2" (transformers' fused
# kernel bypasses them). A text-only VLMambaForCausalLM carries such a config, so its defaults leave them out.
PEFT_REFUSED_ON_MAMBA_CONFIGS = ("out_proj", "conv1d")


def ssm_layers(model_config: PreTrainedConfig) -> tuple[str, str | None]:
    """(text mixer kind, vision mixer kind or None), each "mamba1" or "mamba2", of a VLMamba or text-only config.

    A `VLMambaConfig` gives both (its text_config's model_type, its vision_config's `ssm_layer`); a text
    config (`MambaConfig`, `Mamba2Config`, as used by `VLMambaForCausalLM`) gives no vision kind.
    """
    text_config = getattr(model_config, "text_config", None)
    text_config = model_config if text_config is None else text_config
    text = "mamba2" if getattr(text_config, "model_type", None) == "mamba2" else "mamba1"
    vision_config = getattr(model_config, "vision_config", None)
    if vision_config is None:
        return text, None
    return text, getattr(vision_config, "ssm_layer", "mamba1")


def default_target_modules(include_vision: bool = False, model_config: PreTrainedConfig | None = None) -> str:
    """A regex for PEFT's `target_modules`: the language model's mixer projections (and the vision tower's).

    With `model_config` (a `VLMambaConfig`, or the text config of a `VLMambaForCausalLM`) the names follow
    its mixers: in_proj/x_proj/dt_proj/out_proj for Mamba-1, in_proj/out_proj for Mamba-2, for the text and
    (with `include_vision`) the vision side separately. A text-only config (model_type "mamba"/"mamba2")
    drops out_proj, which PEFT refuses on such configs (see `PEFT_REFUSED_ON_MAMBA_CONFIGS`), although
    VLMamba's mixers never bypass it. Without `model_config` the Mamba-1 names are used; a Mamba-2 VLMamba
    still gets LoRA on in_proj and out_proj, the names its mixers lack being simply not matched.
    """
    text_kind, vision_kind = ssm_layers(model_config) if model_config is not None else ("mamba1", "mamba1")
    text_modules = MAMBA2_LORA_MODULES if text_kind == "mamba2" else TEXT_LORA_MODULES
    if model_config is not None and vision_kind is None:
        text_modules = tuple(m for m in text_modules if m not in PEFT_REFUSED_ON_MAMBA_CONFIGS)
    text = r"(?:.*\.)?(?:language_model|backbone)\.layers\.\d+\.mixer\.(?:" + "|".join(text_modules) + ")"
    if not include_vision:
        return text
    vision_modules = MAMBA2_LORA_MODULES if vision_kind == "mamba2" else VISION_LORA_MODULES
    vision = r"(?:.*\.)?vision_tower\.layers\.\d+\.mixer\.(?:" + "|".join(vision_modules) + ")"
    return f"(?:{text})|(?:{vision})"


def default_lora_config(
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    include_vision: bool = False,
    train_bridger: bool = True,
    model_config: PreTrainedConfig | None = None,
    **kwargs,
) -> LoraConfig:
    """PEFT LoraConfig for VLMamba: LoRA on the mixer projections, the bridger fully trained.

    Pass `model_config=model.config` to target exactly the projections the model's mixers have (see
    `default_target_modules`); a text-only config (no bridger) then gets no `modules_to_save`.
    """
    has_bridger = model_config is None or getattr(model_config, "vision_config", None) is not None
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=default_target_modules(include_vision, model_config),
        modules_to_save=[BRIDGER_MODULE] if train_bridger and has_bridger else None,
        **kwargs,
    )


def apply_lora(model: torch.nn.Module, config: LoraConfig | None = None) -> PeftModel:
    """Wrap `model` with PEFT LoRA adapters; only adapters (and `modules_to_save`) train.

    Without `config`, `default_lora_config(model_config=model.config)`: targets that match the model's
    mixers, Mamba-1 or Mamba-2.
    """
    if config is None:
        config = default_lora_config(model_config=getattr(model, "config", None))
    return get_peft_model(model, config)


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
    "MAMBA2_LORA_MODULES",
    "ssm_layers",
    "default_target_modules",
    "default_lora_config",
    "apply_lora",
    "merge_lora",
    "check_adapter_fits",
    "load_lora_adapter",
]

"""The seed's quick-start API as thin adapters over the transformers classes.

    from vlm_mamba_hf import VLMamba, VLMambaConfig, VisionConfig, LanguageConfig, BridgerConfig, LoRAConfig
    config = VLMambaConfig(vision=VisionConfig(img_size=224, patch_size=16, d_model=768, n_layers=12),
                           language=LanguageConfig(vocab_size=50257, d_model=768, n_layers=12),
                           bridger=BridgerConfig(d_model=768, expansion_factor=4), vision_mode="encoder")
    logits = VLMamba(config)(image, text_tokens)   # [1, 196 + 64, vocab] for a 224 px image and 64 tokens

`VLMambaConfig` is the transformers config itself; it accepts the seed's `vision=`, `language=` and
`bridger=` arguments and translates them; `config.lora = LoRAConfig(...)` makes `VLMamba` apply LoRA. Without image tokens in the text, the image
features are prefixed to it (the seed's convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .configuration_vlm_mamba import VLMambaConfig
from .modeling_vlm_mamba import VLMambaForConditionalGeneration


@dataclass
class VisionConfig:
    """Seed vision settings: image size, patch size, width and depth of the Mamba encoder."""

    img_size: int = 224
    patch_size: int = 16
    d_model: int = 768
    n_layers: int = 12
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    in_channels: int = 3


@dataclass
class LanguageConfig:
    """Seed language-model settings: vocabulary, width and depth of the Mamba LM."""

    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4


@dataclass
class BridgerConfig:
    """Seed bridger settings: input width (the vision width) and the hidden expansion factor."""

    d_model: int = 768
    expansion_factor: int = 4


@dataclass
class LoRAConfig:
    """Seed LoRA settings; applied through PEFT on the language model's mixer projections."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    include_vision: bool = False
    train_bridger: bool = False


class VLMamba(nn.Module):
    """Seed-style model: `VLMamba(config)(image, text_tokens) -> logits`; `.hf_model` is the transformers model.

    With `config.lora` set to a `LoRAConfig`, the model is wrapped by PEFT and only the adapters train.
    """

    def __init__(self, config: VLMambaConfig):
        super().__init__()
        model = VLMambaForConditionalGeneration(config)
        lora = getattr(config, "lora", None)
        if isinstance(lora, LoRAConfig):
            from .lora import apply_lora, default_lora_config

            model = apply_lora(
                model,
                default_lora_config(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    include_vision=lora.include_vision,
                    train_bridger=lora.train_bridger,
                    model_config=model.config,
                ),
            )
        self.hf_model = model
        self.config = config

    def forward(self, image: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """image (b, c, H, W), text_tokens (b, l) -> logits (b, num_image_tokens + l, vocab)."""
        return self.hf_model(input_ids=text_tokens, pixel_values=image).logits


__all__ = ["VLMamba", "VisionConfig", "LanguageConfig", "BridgerConfig", "LoRAConfig"]

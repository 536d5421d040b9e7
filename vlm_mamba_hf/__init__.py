"""vlm-mamba-hf: VLMamba, an attention-free vision-language model for Hugging Face transformers."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    MambaConfig,
)

from .configuration_vlm_mamba import VLMambaConfig, VLMambaVisionConfig
from .modeling_vlm_mamba import (
    VLMambaForCausalLM,
    VLMambaForConditionalGeneration,
    VLMambaModel,
    VLMambaPreTrainedModel,
    VLMambaTextModel,
    VLMambaVisionModel,
)

__version__ = "0.1.0"


def _register() -> None:
    """Make the Auto classes resolve model_type "vlm_mamba" to this package's classes."""
    AutoConfig.register("vlm_mamba", VLMambaConfig, exist_ok=True)
    AutoConfig.register("vlm_mamba_vision", VLMambaVisionConfig, exist_ok=True)
    AutoModel.register(VLMambaConfig, VLMambaModel, exist_ok=True)
    AutoModel.register(VLMambaVisionConfig, VLMambaVisionModel, exist_ok=True)
    AutoModelForImageTextToText.register(VLMambaConfig, VLMambaForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(VLMambaConfig, VLMambaForConditionalGeneration, exist_ok=True)


_register()

__all__ = [
    "MambaConfig",
    "VLMambaConfig",
    "VLMambaVisionConfig",
    "VLMambaForCausalLM",
    "VLMambaForConditionalGeneration",
    "VLMambaModel",
    "VLMambaPreTrainedModel",
    "VLMambaTextModel",
    "VLMambaVisionModel",
]

"""vlm-mamba-hf: VLMamba, an attention-free vision-language model for Hugging Face transformers."""

from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    MambaConfig,
)

from .compat import BridgerConfig, LanguageConfig, LoRAConfig, VisionConfig, VLMamba
from .configuration_vlm_mamba import VLMambaConfig, VLMambaVisionConfig
from .image_processing_vlm_mamba import VLMambaImageProcessor
from .modeling_vlm_mamba import (
    VLMambaForCausalLM,
    VLMambaForConditionalGeneration,
    VLMambaModel,
    VLMambaPreTrainedModel,
    VLMambaTextModel,
    VLMambaVisionModel,
)
from .processing_vlm_mamba import VLMambaProcessor

__version__ = "0.1.0"

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "default_model")
"""The built-in default checkpoint folder shipped inside the package (loadable offline)."""


def _register() -> None:
    """Make the Auto classes resolve model_type "vlm_mamba" to this package's classes."""
    AutoConfig.register("vlm_mamba", VLMambaConfig, exist_ok=True)
    AutoConfig.register("vlm_mamba_vision", VLMambaVisionConfig, exist_ok=True)
    AutoModel.register(VLMambaConfig, VLMambaModel, exist_ok=True)
    AutoModel.register(VLMambaVisionConfig, VLMambaVisionModel, exist_ok=True)
    AutoModelForImageTextToText.register(VLMambaConfig, VLMambaForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(VLMambaConfig, VLMambaForConditionalGeneration, exist_ok=True)
    try:
        from transformers import AutoModelForMultimodalLM
    except ImportError:  # older transformers: the class does not exist
        pass
    else:
        AutoModelForMultimodalLM.register(VLMambaConfig, VLMambaForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(
        VLMambaConfig, image_processor_classes={"pil": VLMambaImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(VLMambaConfig, VLMambaProcessor, exist_ok=True)


_register()

__all__ = [
    "DEFAULT_MODEL",
    "BridgerConfig",
    "LanguageConfig",
    "LoRAConfig",
    "VisionConfig",
    "VLMamba",
    "VLMambaImageProcessor",
    "VLMambaProcessor",
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

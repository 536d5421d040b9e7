"""Training tooling for VLMamba: the data collator, recipes, the Trainer script and the evaluation."""

from .collator import IGNORE_INDEX, VLMambaDataCollator, format_prompt
from .recipes import RECIPES, Recipe, build_model_config, build_processor, build_train_dataset, get_recipe

__all__ = [
    "IGNORE_INDEX",
    "RECIPES",
    "Recipe",
    "VLMambaDataCollator",
    "build_model_config",
    "build_processor",
    "build_train_dataset",
    "format_prompt",
    "get_recipe",
]

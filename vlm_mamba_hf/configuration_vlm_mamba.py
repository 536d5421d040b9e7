"""Configuration of VLMamba: a Mamba vision tower, a bridger, and a Mamba language model.

The language side is configured by transformers' own `MambaConfig` (or `Mamba2Config`), so the
config of a `state-spaces/mamba-*-hf` checkpoint drops in unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import MambaConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

SUPPORTED_ACTIVATIONS = ("silu", "swish")
SUPPORTED_TEXT_MODEL_TYPES = ("mamba", "mamba2")


def _require_positive(config: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{type(config).__name__}.{name} must be a positive integer, got {value!r}. "
                f"Set `{name}` to a value >= 1."
            )


def validate_mamba_text_config(config: PreTrainedConfig) -> None:
    """Raise a clear ValueError when a Mamba language-model config cannot build a model."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(
            f"text_config.model_type must be one of {SUPPORTED_TEXT_MODEL_TYPES}, got {model_type!r}. "
            "Pass a transformers `MambaConfig` or `Mamba2Config`."
        )
    _require_positive(
        config, ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel")
    )
    if model_type == "mamba2":
        validate_mamba2_fields(config)
        validate_time_step_limit(config)
        if config.num_heads != config.expand * config.hidden_size // config.head_dim:
            raise ValueError(
                f"{type(config).__name__}.num_heads ({config.num_heads}) must equal expand * hidden_size / head_dim "
                f"({config.expand} * {config.hidden_size} / {config.head_dim})."
            )
    else:
        _require_positive(config, ("time_step_rank", "intermediate_size"))
    if config.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"{type(config).__name__}.hidden_act must be one of {SUPPORTED_ACTIVATIONS}, got {config.hidden_act!r}."
        )
    if not config.layer_norm_epsilon > 0:
        raise ValueError(f"layer_norm_epsilon must be > 0, got {config.layer_norm_epsilon!r}.")
    if not 0 < config.time_step_min <= config.time_step_max:
        raise ValueError(
            f"Need 0 < time_step_min <= time_step_max, got time_step_min={config.time_step_min!r}, "
            f"time_step_max={config.time_step_max!r}."
        )


def validate_mamba2_fields(config: PreTrainedConfig) -> None:
    """Mamba-2 sizes: head_dim divides expand * hidden_size, n_groups divides the heads, chunk_size >= 1."""
    name = type(config).__name__
    _require_positive(config, ("head_dim", "n_groups", "chunk_size"))
    inner = config.expand * config.hidden_size
    if inner % config.head_dim:
        raise ValueError(
            f"{name}.head_dim ({config.head_dim}) must divide the inner size expand * hidden_size "
            f"({config.expand} * {config.hidden_size} = {inner}); pick a head_dim that divides {inner}."
        )
    heads = inner // config.head_dim
    if heads % config.n_groups:
        raise ValueError(
            f"{name}.n_groups ({config.n_groups}) must divide the number of heads expand * hidden_size / head_dim "
            f"({heads}); pick n_groups among the divisors of {heads}."
        )


def _is_number_sequence(value: object) -> bool:
    """A list or tuple of ints and floats (bools excluded), of any length."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )


def validate_time_step_limit(config: PreTrainedConfig) -> None:
    """`time_step_limit` is two numbers (low, high) with low <= high: the range dt is clamped to (Mamba-2)."""
    limit = getattr(config, "time_step_limit", None)
    if not _is_number_sequence(limit) or len(limit) != 2 or not limit[0] <= limit[1]:
        raise ValueError(
            f"{type(config).__name__}.time_step_limit must be two numbers (low, high) with low <= high, the range "
            f"the Mamba-2 time step dt is clamped to; got {limit!r}. Use (0.0, float('inf')) for no clamping."
        )


@strict
class VLMambaVisionConfig(PreTrainedConfig):
    r"""
    Configuration of the VLMamba vision tower (`VLMambaVisionModel`).

    In `"encoder"` mode the tower is Vim-style: a Conv2d patch embedding, a learned absolute position
    embedding, an optional class token in the middle of the sequence, and `num_hidden_layers`
    bidirectional Mamba blocks. In `"fuyu"` mode (chosen by `VLMambaConfig.vision_mode`) it is one
    Linear over flattened patches plus the position embedding. The defaults are Vim-tiny's shape.

    Args:
        image_size (`int`): side of the (square) input image in pixels; other sizes are resized by the
            image processor, and the position embedding is interpolated if a model sees another size.
        patch_size (`int`): side of a square patch (the Conv2d kernel in encoder mode).
        patch_stride (`int`, *optional*): encoder mode only: the step between patches; smaller than `patch_size`
            gives overlapping patches (Vim's stride-8 "+" models: kernel 16, stride 8). Default: `patch_size`
            (non-overlapping; fuyu mode always is). The patch grid is `(image_size - patch_size) // patch_stride
            + 1` per side, and `image_size - patch_size` must be divisible by the stride.
        num_channels (`int`): input channels (3 for RGB).
        foreground_channel (`bool`): give the patch embedding one more channel, computed from the pixels:
            how far each pixel's colour is from the image's median colour (its background, on plain-background
            images), squashed to [-1, 1]. It is the same for an object of any colour, a colour-invariant cue
            for shape (`foreground_map`). Off by default; pixel_values keep `num_channels` channels either way.
        factored_patches (`bool`): with `foreground_channel`, embed each patch as the sum of two separate
            projections instead of one over all its channels: one of the patch's foreground map alone (where the
            objects are: shape, whatever their colour) and one of the mean colour of its foreground pixels
            (colour, whatever the shape). A joint projection sees colour times mask, so an object whose colour
            and shape never appeared together gives it a feature it has never seen; the sum of two familiar
            parts is one it has (`VLMambaPatchEmbed`). Off by default.
        hidden_size (`int`): width Dv of the patch features.
        num_hidden_layers (`int`): bidirectional Mamba blocks in encoder mode.
        state_size, expand, conv_kernel, time_step_rank, use_bias, use_conv_bias, hidden_act, time_step_*:
            the Mamba mixer's hyper-parameters, as in transformers' `MambaConfig`.
        use_cls_token (`bool`): add a learned class token in the middle of the patch sequence (Vim).
        keep_cls_token (`bool`): pass the class token on to the bridger (else only patch features).
        residual_in_fp32 (`bool`): keep the residual stream in fp32.
        mode (`str`): `"encoder"` or `"fuyu"`; inside a `VLMambaConfig` it always follows `vision_mode`, and it
            is saved so that a standalone tower reloads in the mode it was built in.
        ssm_layer (`str`): the mixer kind: `"mamba1"` (Vim's bidirectional Mamba) or `"mamba2"` (bidirectional
            Mamba-2 / SSD).
        head_dim, n_groups, chunk_size (`int`): Mamba-2 only: channels per head (must divide
            `expand * hidden_size`), groups sharing B and C (must divide the heads), scan chunk length.
        time_step_limit (`tuple[float, float]`): Mamba-2 only: the range (low, high) that dt = softplus(dt + dt_bias)
            is clamped to, as in transformers' `Mamba2Config`; the default (0.0, inf) does not clamp. Stored as a
            tuple of floats.
    """

    model_type = "vlm_mamba_vision"
    base_config_key = "vision_config"

    image_size: int = 224
    patch_size: int = 16
    patch_stride: int | None = None
    num_channels: int = 3
    foreground_channel: bool = False
    factored_patches: bool = False
    hidden_size: int = 192
    num_hidden_layers: int = 24
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | str = "auto"
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    use_cls_token: bool = True
    keep_cls_token: bool = False
    residual_in_fp32: bool = True
    ssm_layer: Literal["mamba1", "mamba2"] = "mamba1"
    mode: Literal["encoder", "fuyu"] = "encoder"
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    time_step_limit: list[int | float] | tuple[int | float, ...] = (0.0, float("inf"))

    def __post_init__(self, **kwargs):
        # JSON gives back a list: keep one form so that a saved and reloaded config compares equal.
        if _is_number_sequence(self.time_step_limit):
            self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        if self.time_step_rank == "auto":
            self.time_step_rank = -(-self.hidden_size // 16) if isinstance(self.hidden_size, int) else 1
        super().__post_init__(**kwargs)

    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def stride(self) -> int:
        """The step between patches (`patch_stride`, or `patch_size` when unset)."""
        return self.patch_size if self.patch_stride is None else self.patch_stride

    def grid_side(self, image_size: int | None = None) -> int:
        """Patches per side for a square image of `image_size` pixels (default: the configured size)."""
        size = self.image_size if image_size is None else image_size
        return (size - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid_side() ** 2

    def check_stride_for_mode(self, mode: str) -> None:
        """Fuyu mode flattens non-overlapping patches: a stride other than the patch size is an error there."""
        if mode == "fuyu" and self.stride != self.patch_size:
            raise ValueError(
                f"patch_stride ({self.stride}) must equal patch_size ({self.patch_size}) in fuyu mode, "
                "which flattens non-overlapping patches; use vision_mode='encoder' for overlapping patches."
            )

    def validate_architecture(self):
        """Sizes positive, image divisible into patches, a supported activation."""
        _require_positive(
            self,
            (
                "image_size",
                "patch_size",
                "num_channels",
                "hidden_size",
                "state_size",
                "expand",
                "conv_kernel",
                "time_step_rank",
            ),
        )
        if not isinstance(self.foreground_channel, bool):
            raise ValueError(f"foreground_channel must be True or False, got {self.foreground_channel!r}.")
        if not isinstance(self.factored_patches, bool):
            raise ValueError(f"factored_patches must be True or False, got {self.factored_patches!r}.")
        if self.factored_patches and not self.foreground_channel:
            raise ValueError(
                "factored_patches=True needs foreground_channel=True: the factored patch embedding reads shape "
                "from the foreground map and colour from the foreground pixels. Set both, or neither."
            )
        if not isinstance(self.num_hidden_layers, int) or self.num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers!r}.")
        if self.patch_stride is not None:
            if not isinstance(self.patch_stride, int) or not 1 <= self.patch_stride <= self.patch_size:
                raise ValueError(
                    f"patch_stride must be an integer from 1 to patch_size ({self.patch_size}), got "
                    f"{self.patch_stride!r}; leave it None for non-overlapping patches."
                )
            self.check_stride_for_mode(self.mode)
        if self.image_size < self.patch_size or (self.image_size - self.patch_size) % self.stride:
            raise ValueError(
                f"image_size ({self.image_size}) must be at least patch_size ({self.patch_size}) and "
                f"image_size - patch_size must be divisible by the patch stride ({self.stride}); pick an "
                "image_size that is a multiple of the patch size"
                + (" plus or minus a multiple of the stride." if self.stride != self.patch_size else ".")
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {SUPPORTED_ACTIVATIONS}, got {self.hidden_act!r}.")
        validate_time_step_limit(self)
        if self.ssm_layer == "mamba2":
            validate_mamba2_fields(self)


def _seed_field(obj, name: str, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _seed_kwargs_to_fields(kwargs: dict) -> dict:
    """Pop the seed's `vision=`, `language=`, `bridger=` settings (objects or dicts) from kwargs and return
    the equivalent VLMambaConfig fields. Kept here, not in compat.py, so exported remote code needs no extra file.
    """
    vision, language, bridger = (
        kwargs.pop("vision", None),
        kwargs.pop("language", None),
        kwargs.pop("bridger", None),
    )
    fields = {}
    if vision is not None:
        fields["vision_config"] = VLMambaVisionConfig(
            image_size=_seed_field(vision, "img_size", 224),
            patch_size=_seed_field(vision, "patch_size", 16),
            hidden_size=_seed_field(vision, "d_model", 768),
            num_hidden_layers=_seed_field(vision, "n_layers", 12),
            state_size=_seed_field(vision, "d_state", 16),
            expand=_seed_field(vision, "expand", 2),
            conv_kernel=_seed_field(vision, "d_conv", 4),
            num_channels=_seed_field(vision, "in_channels", 3),
        )
    if language is not None:
        vocab_size = _seed_field(language, "vocab_size", 50257)
        fields["text_config"] = MambaConfig(
            vocab_size=vocab_size,
            hidden_size=_seed_field(language, "d_model", 768),
            num_hidden_layers=_seed_field(language, "n_layers", 12),
            state_size=_seed_field(language, "d_state", 16),
            expand=_seed_field(language, "expand", 2),
            conv_kernel=_seed_field(language, "d_conv", 4),
        )
        if "image_token_id" not in kwargs:
            fields["image_token_id"] = vocab_size - 1  # the seed had no image token; reserve the last id
    if bridger is not None:
        dv = _seed_field(vision, "d_model") if vision is not None else None
        if dv is not None and _seed_field(bridger, "d_model", dv) != dv:
            raise ValueError(
                f"BridgerConfig.d_model ({_seed_field(bridger, 'd_model')}) must equal the vision width "
                f"VisionConfig.d_model ({dv})."
            )
        fields["projector_expansion"] = _seed_field(bridger, "expansion_factor", 4)
    return fields


@strict
class VLMambaConfig(PreTrainedConfig):
    r"""
    Configuration of `VLMambaForConditionalGeneration`: vision tower, bridger and Mamba language model.

    Args:
        vision_config (`VLMambaVisionConfig` or `dict`): the vision tower.
        text_config (`MambaConfig` or `dict`): the language model (transformers' own config class).
        vision_mode (`"encoder"` or `"fuyu"`): deep bidirectional Mamba encoder, or Fuyu-style linear
            patch projection with no encoder.
        image_token_id (`int`): id of the `<image>` token; the processor expands each `<image>` into
            `num_image_tokens` of them and the model writes one vision feature at each.
        projector_expansion (`int`): the bridger's hidden width is `projector_expansion * Dv`.
        projector_hidden_act (`str`): activation inside the bridger.
        projector_layernorm (`bool`): LayerNorm on the vision features before the bridger.
        vision_feature_layer (`int`): which vision block's output feeds the bridger (-1: after the final
            norm; other indices select `hidden_states[i]` of the tower).
        tie_word_embeddings (`bool`): tie `lm_head` to the input embeddings.

    Example:

    ```python
    >>> from transformers import MambaConfig
    >>> from vlm_mamba_hf import VLMambaConfig, VLMambaVisionConfig, VLMambaForConditionalGeneration
    >>> config = VLMambaConfig(
    ...     vision_config=VLMambaVisionConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2),
    ...     text_config=MambaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2),
    ...     image_token_id=4,
    ... )
    >>> model = VLMambaForConditionalGeneration(config)
    ```
    """

    model_type = "vlm_mamba"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "vision_config": VLMambaVisionConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mamba"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_mode: Literal["encoder", "fuyu"] = "encoder"
    image_token_id: int = 3
    projector_expansion: int = 4
    projector_hidden_act: str = "gelu"
    projector_layernorm: bool = False
    projector_bias: bool = True
    vision_feature_layer: int = -1
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if any(key in kwargs for key in ("vision", "language", "bridger")):
            # The seed's quick-start arguments (see vlm_mamba_hf.compat): translate to this config's fields.
            for key, value in _seed_kwargs_to_fields(kwargs).items():
                setattr(self, key, value)
        super().__post_init__(**kwargs)
        self.vision_config.mode = self.vision_mode
        # transformers keeps tie_word_embeddings on the text config for text-only loading; mirror it.
        self.text_config.tie_word_embeddings = self.tie_word_embeddings

    def to_dict(self) -> dict:
        output = super().to_dict()
        lora = output.get("lora")
        if dataclasses.is_dataclass(lora):  # the seed's LoRAConfig, set as `config.lora`
            output["lora"] = dataclasses.asdict(lora)
        return output

    @property
    def num_image_tokens(self) -> int:
        """Vision features per image: patches, plus the class token when it is kept (encoder mode)."""
        vision = self.vision_config
        keep_cls = self.vision_mode == "encoder" and vision.use_cls_token and vision.keep_cls_token
        return vision.num_patches + int(keep_cls)

    def validate_architecture(self):
        """Sub-configs valid, the image token inside the vocabulary, projector sizes positive."""
        validate_mamba_text_config(self.text_config)
        self.vision_config.validate_architecture()
        if self.vision_mode not in ("encoder", "fuyu"):
            raise ValueError(f"vision_mode must be 'encoder' or 'fuyu', got {self.vision_mode!r}.")
        _require_positive(self, ("projector_expansion",))
        vocab = self.text_config.vocab_size
        if not 0 <= self.image_token_id < vocab:
            raise ValueError(
                f"image_token_id ({self.image_token_id}) must be inside the text vocabulary [0, {vocab}). "
                "Add the <image> token to the tokenizer and resize the embeddings, or fix image_token_id."
            )
        depth = self.vision_config.num_hidden_layers
        if self.vision_mode == "encoder" and not -(depth + 1) <= self.vision_feature_layer <= depth:
            raise ValueError(
                f"vision_feature_layer ({self.vision_feature_layer}) must index the vision tower's "
                f"{depth + 1} hidden states (-{depth + 1}..{depth})."
            )


__all__ = ["VLMambaConfig", "VLMambaVisionConfig", "MambaConfig", "validate_mamba_text_config"]

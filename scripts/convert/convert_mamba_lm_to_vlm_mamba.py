"""Build a VLMamba checkpoint around a pretrained Mamba or Mamba-2 language model.

    python scripts/convert/convert_mamba_lm_to_vlm_mamba.py --lm SRC --output OUT \\
        [--vision SRC2 | --vision-config JSON_OR_PRESET] [--vision-mode encoder|fuyu] \\
        [--image-token "<image>"] [--image-token-id N] [--tokenizer DIR] [--dtype auto] [--overwrite]

SRC is one of:
- a transformers Mamba or Mamba-2 folder (`config.json` with `model_type: mamba` or `mamba2`, as written by
  `MambaForCausalLM` / `Mamba2ForCausalLM.save_pretrained`; `model.safetensors`, sharded or not, or
  `pytorch_model.bin`), or a Hub id such as `state-spaces/mamba-130m-hf` (downloaded with
  `huggingface_hub.snapshot_download`; with HF_HUB_OFFLINE set only the local cache is used);
- an original `mamba_ssm` folder (`config.json` with `d_model`, `n_layer`, `vocab_size`, `ssm_cfg`, ... and
  `pytorch_model.bin` with `backbone.embedding.weight`, ...; the vocabulary padded to a multiple of
  `pad_vocab_size_multiple`). `ssm_cfg.layer` picks the mixer: "Mamba1" (default) or "Mamba2"; a Mamba-2
  `ssm_cfg` maps onto transformers' `Mamba2Config` (d_state, d_conv, expand, headdim, ngroups, chunk_size, dt_min,
  dt_max, dt_init_floor, dt_limit, bias, conv_bias; mamba_ssm's defaults where absent; num_heads = expand *
  d_model / headdim).

Refused with an error naming the field: hybrid attention layers (`attn_layer_idx`), MLP layers
(`d_intermediate > 0`), LayerNorm instead of RMSNorm (`rms_norm: false`), and the Mamba-2 variants VLMamba's
mixer cannot represent: `ssm_cfg.d_ssm` other than expand * d_model (a gated MLP beside the SSM), `D_has_hdim: true`
(a skip weight per channel), `rmsnorm: false` (no gated norm) and `norm_before_gate: true`.

The language model's weights move under `model.language_model.` unchanged. The tokenizer (SRC's, or
`--tokenizer`) gets `<image>` as a special token when it lacks it, and the embedding and the `lm_head` (tied or
not) grow to cover it: new rows are the mean of the existing ones; the checkpoint's (padded) vocabulary never shrinks.
Without a tokenizer, `--image-token-id` is required. The vision tower is freshly initialised (a
`VLMambaVisionConfig`: default Vim-tiny shape, a preset `vim-tiny|vim-small|vim-base`, or a JSON file) or taken from
`--vision`: a folder written by `convert_vim_to_vlm_mamba.py` (a `VLMambaVisionModel`) or another VLMamba
checkpoint (its vision tower, and its projector when the hidden sizes fit). The bridger is fresh unless taken
from such a checkpoint.

After saving, the result is verified: its text-only logits must match transformers' `MambaForCausalLM` (Mamba-2:
`Mamba2ForCausalLM`) on the source weights within `--atol` (1e-4, fp32) on a random prompt. A failed check leaves
no output folder.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from vlm_mamba_hf import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaVisionConfig
from vlm_mamba_hf.model_card import card_metadata, write_model_card

if __package__:
    from . import _common as common
else:  # run as a script (python scripts/convert/...)
    import _common as common

FP32_ATOL = 1e-4  # float32 logits, reference sequential scan vs our scan
VISION_PRESETS = {"vim-tiny": 192, "vim-small": 384, "vim-base": 768}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]  # "*.bin" only when no safetensors


def _key_pattern(embedding: str, mixer_pattern: str) -> re.Pattern:
    """Every key of a Mamba LM with the given embedding name and mixer parameters."""
    return re.compile(
        rf"backbone\.({embedding}\.weight|norm_f\.weight|layers\.\d+\.norm\.weight|layers\.\d+\.mixer\.({mixer_pattern}))"
        r"|lm_head\.weight"
    )


# transformers (`embeddings`) and mamba_ssm (`embedding`) key names, by transformers model_type.
_HF_KEYS = {
    "mamba": _key_pattern("embeddings", common.MIXER_PATTERN),
    "mamba2": _key_pattern("embeddings", common.MAMBA2_MIXER_PATTERN),
}
_SSM_KEYS = {
    "mamba": _key_pattern("embedding", common.MIXER_PATTERN),
    "mamba2": _key_pattern("embedding", common.MAMBA2_MIXER_PATTERN),
}
REFERENCE_MODELS = {"mamba": MambaForCausalLM, "mamba2": Mamba2ForCausalLM}

# mamba_ssm's ssm_cfg name -> transformers MambaConfig name (Mamba-1).
_SSM_CFG_NAMES = {
    "d_state": "state_size",
    "d_conv": "conv_kernel",
    "expand": "expand",
    "dt_rank": "time_step_rank",
    "dt_min": "time_step_min",
    "dt_max": "time_step_max",
    "dt_init": "time_step_init_scheme",
    "dt_scale": "time_step_scale",
    "dt_init_floor": "time_step_floor",
    "conv_bias": "use_conv_bias",
    "bias": "use_bias",
}
_SSM_CFG_IGNORED = ("layer", "use_fast_path")

# mamba_ssm `Mamba2` argument -> (transformers Mamba2Config name, mamba_ssm's default). The defaults are
# mamba_ssm's, not Mamba2Config's (which differ, e.g. n_groups=8), because an absent key means mamba_ssm's value.
_SSM2_CFG_NAMES = {
    "d_state": ("state_size", 128),
    "d_conv": ("conv_kernel", 4),
    "expand": ("expand", 2),
    "headdim": ("head_dim", 64),
    "ngroups": ("n_groups", 1),
    "chunk_size": ("chunk_size", 256),
    "dt_min": ("time_step_min", 0.001),
    "dt_max": ("time_step_max", 0.1),
    "dt_init_floor": ("time_step_floor", 1e-4),
    "dt_limit": ("time_step_limit", (0.0, float("inf"))),
    "bias": ("use_bias", False),
    "conv_bias": ("use_conv_bias", True),
}
# Checked against what VLMambaMamba2Mixer computes (see _check_mamba2_variant).
_SSM2_CFG_CHECKED = ("d_ssm", "D_has_hdim", "rmsnorm", "norm_before_gate")
# Initialisation-only or kernel choices: no effect on the function the weights compute.
_SSM2_CFG_IGNORED = ("layer", "conv_init", "A_init_range", "use_mem_eff_path")
_SSM_TOP_LEVEL = (
    "d_model",
    "n_layer",
    "vocab_size",
    "ssm_cfg",
    "rms_norm",
    "residual_in_fp32",
    "fused_add_norm",
    "pad_vocab_size_multiple",
    "tie_embeddings",
    "d_intermediate",
    "attn_layer_idx",
    "attn_cfg",
)
_SSM_NORM_EPSILON = 1e-5  # mamba_ssm's norm_epsilon, and the eps its Mamba2 gated RMSNorm hard-codes


# ----------------------------------------------------------------------------------------------------------
# Pure conversions
# ----------------------------------------------------------------------------------------------------------


def _check_mamba_ssm_backbone(config: dict, allowed_ssm_cfg: tuple[str, ...]) -> None:
    """Refuse backbones VLMamba cannot hold (MLP, attention, LayerNorm) and list unknown keys."""
    if config.get("d_intermediate", 0):
        raise NotImplementedError(
            f"d_intermediate={config['d_intermediate']}: this checkpoint has MLP layers between the Mamba mixers, "
            "which VLMamba's language model does not have. Convert a pure Mamba checkpoint (d_intermediate 0)."
        )
    if config.get("attn_layer_idx"):
        raise NotImplementedError(
            f"attn_layer_idx={config['attn_layer_idx']}: hybrid Mamba/attention models are not supported; VLMamba's "
            "language model has Mamba blocks only. Convert a pure Mamba checkpoint (attn_layer_idx empty)."
        )
    if not config.get("rms_norm", True):
        raise NotImplementedError(
            "rms_norm=False (LayerNorm blocks) is not supported: VLMamba uses RMSNorm. Convert a checkpoint "
            "trained with rms_norm=True."
        )
    ssm_cfg = config.get("ssm_cfg") or {}
    unknown = [k for k in config if k not in _SSM_TOP_LEVEL and not k.startswith("_")]
    unknown += [f"ssm_cfg.{k}" for k in ssm_cfg if k not in allowed_ssm_cfg]
    common.raise_on_unknown_keys(unknown, "the mamba_ssm config")
    missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"The mamba_ssm config lacks {missing}.")


def _padded_vocab_size(config: dict) -> int:
    """mamba_ssm's vocabulary: vocab_size rounded up to a multiple of pad_vocab_size_multiple (default 8)."""
    multiple = int(config.get("pad_vocab_size_multiple", 8))
    return -(-int(config["vocab_size"]) // multiple) * multiple


def mamba_ssm_config_to_mamba_config(config: dict) -> MambaConfig:
    """An original `mamba_ssm` Mamba-1 config dict -> transformers `MambaConfig` (vocabulary padded as mamba_ssm pads)."""
    ssm_cfg = dict(config.get("ssm_cfg") or {})
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise NotImplementedError(
            f"ssm_cfg.layer is {ssm_cfg['layer']!r}, not 'Mamba1': use mamba_ssm_config_to_mamba2_config for "
            "'Mamba2' (or mamba_ssm_config_to_hf_config, which picks by the layer)."
        )
    _check_mamba_ssm_backbone(config, tuple(_SSM_CFG_NAMES) + _SSM_CFG_IGNORED)
    kwargs = {hf: ssm_cfg[ssm] for ssm, hf in _SSM_CFG_NAMES.items() if ssm in ssm_cfg}
    return MambaConfig(
        vocab_size=_padded_vocab_size(config),
        hidden_size=int(config["d_model"]),
        num_hidden_layers=int(config["n_layer"]),
        residual_in_fp32=bool(config.get("residual_in_fp32", True)),
        tie_word_embeddings=bool(config.get("tie_embeddings", True)),
        layer_norm_epsilon=_SSM_NORM_EPSILON,
        **kwargs,
    )


def _check_mamba2_variant(ssm_cfg: dict, d_model: int, expand: int) -> None:
    """Refuse the mamba_ssm `Mamba2` options that VLMambaMamba2Mixer (and transformers' Mamba2Mixer) cannot run."""
    inner = expand * d_model
    d_ssm = ssm_cfg.get("d_ssm")
    if d_ssm is not None and d_ssm != inner:
        raise NotImplementedError(
            f"ssm_cfg.d_ssm={d_ssm} differs from expand * d_model ({expand} * {d_model} = {inner}): the other "
            f"{inner - d_ssm} channels of each mixer form a gated MLP beside the SSM, which VLMamba's Mamba-2 mixer "
            "does not have. Only checkpoints with d_ssm unset (or equal to expand * d_model) convert."
        )
    if ssm_cfg.get("D_has_hdim", False):
        raise NotImplementedError(
            "ssm_cfg.D_has_hdim=True: this checkpoint's skip weight D has one value per channel, VLMamba's Mamba-2 "
            "mixer one per head. Only checkpoints trained with D_has_hdim=False (mamba_ssm's default) convert."
        )
    if not ssm_cfg.get("rmsnorm", True):
        raise NotImplementedError(
            "ssm_cfg.rmsnorm=False: this checkpoint's mixers gate y by silu(z) without the gated RMSNorm that "
            "VLMamba's Mamba-2 mixer always applies. Only checkpoints trained with rmsnorm=True (mamba_ssm's "
            "default) convert."
        )
    if ssm_cfg.get("norm_before_gate", False):
        raise NotImplementedError(
            "ssm_cfg.norm_before_gate=True: this checkpoint normalises y before multiplying by silu(z); VLMamba's "
            "Mamba-2 mixer (like transformers' Mamba2) gates first. Only checkpoints trained with "
            "norm_before_gate=False (mamba_ssm's default) convert."
        )


def _time_step_limit(value) -> tuple[float, float]:
    """ssm_cfg.dt_limit (a JSON list) -> (low, high) floats, checked."""
    numbers = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    if not numbers or len(value) != 2 or not value[0] <= value[1]:
        raise ValueError(
            f"ssm_cfg.dt_limit must be two numbers [low, high] with low <= high, got {value!r}. Fix it in "
            "config.json, or remove it for mamba_ssm's default (0.0, inf)."
        )
    return float(value[0]), float(value[1])


def mamba_ssm_config_to_mamba2_config(config: dict) -> Mamba2Config:
    """An original `mamba_ssm` config with `ssm_cfg.layer == "Mamba2"` -> transformers `Mamba2Config`.

    Absent `ssm_cfg` keys take mamba_ssm's `Mamba2` defaults; num_heads = expand * d_model / headdim; the vocabulary
    is padded as mamba_ssm pads it. Options VLMamba's mixer cannot represent raise NotImplementedError.
    """
    ssm_cfg = dict(config.get("ssm_cfg") or {})
    if ssm_cfg.get("layer") != "Mamba2":
        raise NotImplementedError(
            f"ssm_cfg.layer is {ssm_cfg.get('layer', 'Mamba1')!r}, not 'Mamba2': use mamba_ssm_config_to_mamba_config."
        )
    _check_mamba_ssm_backbone(config, tuple(_SSM2_CFG_NAMES) + _SSM2_CFG_CHECKED + _SSM2_CFG_IGNORED)
    kwargs = {hf: ssm_cfg.get(ssm, default) for ssm, (hf, default) in _SSM2_CFG_NAMES.items()}
    kwargs["time_step_limit"] = _time_step_limit(kwargs["time_step_limit"])
    d_model, expand, head_dim = int(config["d_model"]), int(kwargs["expand"]), int(kwargs["head_dim"])
    _check_mamba2_variant(ssm_cfg, d_model, expand)
    if head_dim < 1 or (expand * d_model) % head_dim:
        raise ValueError(
            f"ssm_cfg.headdim ({head_dim}) must divide expand * d_model ({expand} * {d_model} = {expand * d_model})."
        )
    return Mamba2Config(
        vocab_size=_padded_vocab_size(config),
        hidden_size=d_model,
        num_hidden_layers=int(config["n_layer"]),
        num_heads=expand * d_model // head_dim,
        residual_in_fp32=bool(config.get("residual_in_fp32", True)),
        tie_word_embeddings=bool(config.get("tie_embeddings", True)),
        layer_norm_epsilon=_SSM_NORM_EPSILON,
        # GPT-NeoX's tokenizer, which mamba_ssm's checkpoints use: <|endoftext|> is id 0 (as MambaConfig's defaults).
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        **kwargs,
    )


def mamba_ssm_config_to_hf_config(config: dict) -> MambaConfig | Mamba2Config:
    """An original `mamba_ssm` config dict -> `MambaConfig` or `Mamba2Config`, by `ssm_cfg.layer`."""
    layer = (config.get("ssm_cfg") or {}).get("layer", "Mamba1")
    if layer == "Mamba1":
        return mamba_ssm_config_to_mamba_config(config)
    if layer == "Mamba2":
        return mamba_ssm_config_to_mamba2_config(config)
    raise NotImplementedError(
        f"ssm_cfg.layer={layer!r} is not supported: only 'Mamba1' and 'Mamba2' language models convert."
    )


def convert_mamba_ssm_state_dict(
    state_dict: dict[str, torch.Tensor], model_type: str = "mamba"
) -> dict[str, torch.Tensor]:
    """mamba_ssm `MambaLMHeadModel` keys -> transformers `MambaForCausalLM` / `Mamba2ForCausalLM` keys.

    Only the embedding is renamed (`backbone.embedding` -> `backbone.embeddings`); `model_type` ("mamba" or
    "mamba2") picks the mixer parameters that are allowed.
    """
    mixer = ", ".join(common.MAMBA2_MIXER_PARAMS if model_type == "mamba2" else common.MIXER_PARAMS)
    common.raise_on_unknown_keys(
        [k for k in state_dict if not _SSM_KEYS[model_type].fullmatch(k)],
        "the mamba_ssm state dict",
        "Expected backbone.embedding.weight, backbone.layers.N.norm.weight, backbone.layers.N.mixer.{"
        + mixer
        + "}, backbone.norm_f.weight, lm_head.weight (Mamba blocks without MLP or attention layers).",
    )
    rename = {"backbone.embedding.weight": "backbone.embeddings.weight"}
    return {rename.get(k, k): v for k, v in state_dict.items()}


def lm_state_dict_to_vlm(
    state_dict: dict[str, torch.Tensor], prefix: str = "model.language_model.", model_type: str = "mamba"
) -> dict[str, torch.Tensor]:
    """transformers `MambaForCausalLM` / `Mamba2ForCausalLM` keys -> VLMamba keys: `backbone.*` -> `{prefix}*`.

    `lm_head.weight` is kept; a missing one (tied, so not saved) becomes the embedding matrix. `model_type`
    ("mamba" or "mamba2") picks the mixer parameters that are allowed.
    """
    reference = REFERENCE_MODELS[model_type].__name__
    common.raise_on_unknown_keys(
        [k for k in state_dict if not _HF_KEYS[model_type].fullmatch(k)],
        "the Mamba language-model state dict",
        f"Expected transformers {reference} names: backbone.embeddings.weight, backbone.layers.N.norm.weight, "
        "backbone.layers.N.mixer.*, backbone.norm_f.weight, lm_head.weight.",
    )
    if "backbone.embeddings.weight" not in state_dict:
        raise ValueError("The Mamba language-model state dict has no backbone.embeddings.weight.")
    converted = {
        prefix + k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
    }
    converted["lm_head.weight"] = state_dict.get("lm_head.weight", state_dict["backbone.embeddings.weight"])
    return converted


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def resolve_source(source: str, flag: str = "--lm") -> Path:
    """A local folder as is; a Hub id through `snapshot_download` (the local cache only when offline)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{flag} {source!r} is a file; pass the model folder that holds config.json.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise FileNotFoundError(
            f"{flag} {source!r} is neither a local folder nor a Hub repo id like 'owner/name'."
        )
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        folder = Path(snapshot_download(source, allow_patterns=HUB_PATTERNS, local_files_only=offline))
        if not any(folder.glob("*.safetensors")):  # only pickled weights: fetch those
            patterns = HUB_PATTERNS + ["*.bin"]
            folder = Path(snapshot_download(source, allow_patterns=patterns, local_files_only=offline))
        return folder
    except Exception as error:  # the Hub client raises many kinds (HTTP, connection, cache miss)
        if offline:
            message = (
                f"{flag} {source!r} is not a local folder and HF_HUB_OFFLINE is set, so it cannot be downloaded "
                "(and it is not in the local Hugging Face cache). Download it where there is network "
                f"(`hf download {source} --local-dir DIR`) and pass the local folder DIR, or unset HF_HUB_OFFLINE."
            )
        else:
            message = (
                f"Could not download {source!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
                "Check the repo id and the network; without network, pass a local folder (or set HF_HUB_OFFLINE=1 "
                "to use the local cache)."
            )
        raise OSError(message) from error


@dataclass
class LanguageModelSource:
    """A Mamba or Mamba-2 LM in transformers names (float32), its config, and the dtype it was stored in."""

    config: MambaConfig | Mamba2Config
    state_dict: dict[str, torch.Tensor]
    dtype: torch.dtype
    kind: str


def load_language_model(folder: Path) -> LanguageModelSource:
    """Read a transformers or original mamba_ssm Mamba / Mamba-2 LM folder into transformers names."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; it is not a Mamba language-model folder.")
    raw = common.read_json(config_path)
    model_type = raw.get("model_type")
    if model_type in ("mamba", "mamba2"):
        config_class = Mamba2Config if model_type == "mamba2" else MambaConfig
        config = config_class.from_pretrained(str(folder))
        state_dict = common.load_weights_folder(folder)
        if not any(k.startswith("backbone.") for k in state_dict):  # a bare MambaModel / Mamba2Model
            state_dict = {f"backbone.{k}": v for k, v in state_dict.items()}
        kind = "transformers Mamba2" if model_type == "mamba2" else "transformers Mamba"
    elif "d_model" in raw and "n_layer" in raw:
        config = mamba_ssm_config_to_hf_config(raw)
        weights = common.load_weights_folder(folder)
        state_dict = convert_mamba_ssm_state_dict(weights, config.model_type)
        kind = "mamba_ssm Mamba2" if config.model_type == "mamba2" else "mamba_ssm"
    else:
        raise ValueError(
            f"{config_path} is neither a transformers Mamba config (model_type 'mamba' or 'mamba2') nor an original "
            f"mamba_ssm config (d_model, n_layer, ...); model_type is {model_type!r}."
        )
    dtype = common.dominant_float_dtype(state_dict)
    return LanguageModelSource(config, common.to_float32(state_dict), dtype, kind)


@dataclass
class VisionSource:
    """Vision tower (and optionally projector) weights to reuse, unprefixed, with their configs."""

    config: VLMambaVisionConfig
    mode: str
    tower: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor] | None
    projector_kwargs: dict
    text_hidden_size: int | None
    image_processor: object | None


def load_vision_source(folder: Path) -> VisionSource:
    """A converted Vim folder (`VLMambaVisionModel`) or a VLMamba checkpoint folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--vision {folder} has no config.json.")
    model_type = common.read_json(config_path).get("model_type")
    weights = common.to_float32(common.load_weights_folder(folder))
    image_processor = None
    if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
        try:
            from vlm_mamba_hf.image_processing_vlm_mamba import VLMambaImageProcessor

            image_processor = VLMambaImageProcessor.from_pretrained(str(folder))
        except ImportError:
            image_processor = None
    if model_type == "vlm_mamba_vision":
        config = VLMambaVisionConfig.from_pretrained(str(folder))
        mode = (
            "fuyu"
            if weights.get("patch_embed.proj.weight", torch.empty(0, 0, 0, 0)).dim() == 2
            else "encoder"
        )
        return VisionSource(config, mode, weights, None, {}, None, image_processor)
    if model_type == "vlm_mamba":
        config = VLMambaConfig.from_pretrained(str(folder))
        kwargs = {
            name: getattr(config, name)
            for name in (
                "projector_expansion",
                "projector_hidden_act",
                "projector_layernorm",
                "projector_bias",
                "vision_feature_layer",
            )
        }
        return VisionSource(
            config.vision_config,
            config.vision_mode,
            common.strip_prefix(weights, "model.vision_tower."),
            common.strip_prefix(weights, "model.multi_modal_projector."),
            kwargs,
            config.text_config.hidden_size,
            image_processor,
        )
    raise ValueError(
        f"--vision {folder}: model_type {model_type!r} is neither 'vlm_mamba_vision' (convert a Vim .pth with "
        "convert_vim_to_vlm_mamba.py first) nor 'vlm_mamba' (a VLMamba checkpoint)."
    )


def resolve_vision_config(spec: str | None) -> VLMambaVisionConfig:
    """A fresh vision config: default (Vim-tiny shape), a preset name, or a JSON file of VLMambaVisionConfig fields."""
    if spec is None:
        return VLMambaVisionConfig()
    if spec in VISION_PRESETS:
        return VLMambaVisionConfig(hidden_size=VISION_PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"--vision-config {spec!r} is neither a JSON file nor a preset ({', '.join(VISION_PRESETS)})."
        )
    data = common.read_json(path)
    if data.get("model_type") == "vlm_mamba":
        data = data.get("vision_config") or {}
    known = set(VLMambaVisionConfig().to_dict())
    common.raise_on_unknown_keys([k for k in data if k not in known], f"--vision-config {path}")
    data = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "architectures")}
    return VLMambaVisionConfig(**data)


# ----------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------


def verify_text_logits(
    converted: VLMambaForConditionalGeneration,
    text_config: MambaConfig | Mamba2Config,
    source_state_dict: dict[str, torch.Tensor],
    image_token_id: int,
    atol: float = FP32_ATOL,
    seq_len: int = 16,
) -> float:
    """Max |logit difference| (fp32) between a VLMamba (input_ids only) and transformers' reference LM.

    The reference is `MambaForCausalLM`, or `Mamba2ForCausalLM` for a Mamba-2 config (its PyTorch path pads the
    prompt to a multiple of chunk_size itself, so any `seq_len` works; 16 is shorter than one chunk).
    The prompt is random ids below the source vocabulary, avoiding the image token; raises when above `atol`.
    """
    vocab = text_config.vocab_size
    reference_class = REFERENCE_MODELS[text_config.model_type]
    name = reference_class.__name__
    with torch.device("meta"):
        reference = reference_class(text_config)
    reference_sd = dict(source_state_dict)
    reference_sd.setdefault("lm_head.weight", reference_sd["backbone.embeddings.weight"])
    reference.load_state_dict(reference_sd, strict=True, assign=True)
    reference.eval()

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - int(image_token_id < vocab), (2, seq_len), generator=generator)
    if image_token_id < vocab:
        ids = ids + (ids >= image_token_id).long()
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits.float()
        actual = converted(input_ids=ids, use_cache=False).logits.float()[..., :vocab]
    diff = (expected - actual).abs().max().item()
    print(f"verify: max |logits - {name} logits| = {diff:.3e} (fp32, atol {atol:g})")
    if not diff <= atol:
        raise common.ConversionError(
            f"Verification failed: the converted model's text logits differ from transformers' {name} "
            f"by {diff:.3e} > {atol:g}. Nothing was saved."
        )
    return diff


def _check_round_trip(reloaded: dict[str, torch.Tensor], model: VLMambaForConditionalGeneration) -> None:
    """Every reloaded tensor equals the one that was saved."""
    saved = model.state_dict()
    differ = [k for k in saved if k not in reloaded or not torch.equal(reloaded[k], saved[k].float())]
    if differ or set(reloaded) - set(saved):
        raise common.ConversionError(
            f"The saved checkpoint does not reload identically; differing tensors: {differ[:20]}."
        )


def _image_token_and_vocab(
    tok, image_token: str, image_token_id: int | None, vocab: int, report: common.ConversionReport
) -> tuple[int, int]:
    """(image token id, new vocabulary size): from the tokenizer (adding the token if missing) or the given id."""
    if tok is not None:
        token_id, added = common.ensure_image_token(tok, image_token)
        if image_token_id is not None and image_token_id != token_id:
            raise ValueError(
                f"--image-token-id {image_token_id} disagrees with the tokenizer's {image_token!r} ({token_id})."
            )
        if added:
            report.notes.append(f"added {image_token!r} to the tokenizer as special token id {token_id}")
        return token_id, max(vocab, len(tok))
    if image_token_id is None:
        raise ValueError(
            "The language model has no tokenizer, so the image token id is unknown. Pass --tokenizer DIR (a "
            f"tokenizer folder; {image_token!r} is added if missing) or --image-token-id N."
        )
    if image_token_id < 0:
        raise ValueError(f"--image-token-id must be >= 0, got {image_token_id}.")
    return image_token_id, max(vocab, image_token_id + 1)


def _vision_part(
    vision_source: VisionSource | None,
    vision_config: str | None,
    vision_mode: str | None,
    text_hidden_size: int,
    report: common.ConversionReport,
) -> tuple[VLMambaVisionConfig, str, dict[str, torch.Tensor], dict]:
    """(vision config, vision mode, prefixed tower/projector weights to reuse, projector config kwargs)."""
    if vision_source is None:
        return resolve_vision_config(vision_config), vision_mode or "encoder", {}, {}
    if vision_mode and vision_mode != vision_source.mode:
        raise ValueError(
            f"--vision-mode {vision_mode} does not match the --vision tower, which is a {vision_source.mode}-mode "
            "tower (a Vim encoder cannot run in fuyu mode)."
        )
    weights = {f"model.vision_tower.{k}": v for k, v in vision_source.tower.items()}
    if vision_source.projector and vision_source.text_hidden_size == text_hidden_size:
        weights.update({f"model.multi_modal_projector.{k}": v for k, v in vision_source.projector.items()})
    elif vision_source.projector:
        report.notes.append(
            f"projector not reused: it maps to hidden size {vision_source.text_hidden_size}, the language model "
            f"has {text_hidden_size}"
        )
    return vision_source.config, vision_source.mode, weights, dict(vision_source.projector_kwargs)


def convert_mamba_lm(
    lm: str,
    output: str | os.PathLike,
    vision: str | None = None,
    vision_config: str | None = None,
    vision_mode: str | None = None,
    image_token: str = "<image>",
    image_token_id: int | None = None,
    tokenizer: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    atol: float = FP32_ATOL,
) -> Path:
    """Convert a Mamba LM (+ optional vision source) into a verified VLMamba folder at `output`; returns it."""
    if vision and vision_config:
        raise ValueError("Pass either --vision (reuse a tower) or --vision-config (fresh tower), not both.")
    source_dir = resolve_source(lm)
    source = load_language_model(source_dir)
    print(
        f"language model: {source.kind} from {source_dir} ({source.dtype}, vocab {source.config.vocab_size})"
    )
    report = common.ConversionReport()

    tokenizer_dir = resolve_source(tokenizer, "--tokenizer") if tokenizer else None
    if tokenizer_dir is None and common.has_tokenizer(source_dir):
        tokenizer_dir = source_dir
    tok = common.load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    original_vocab = source.config.vocab_size
    image_token_id, vocab = _image_token_and_vocab(tok, image_token, image_token_id, original_vocab, report)

    text_config = copy.deepcopy(source.config)
    text_config.vocab_size = vocab
    tied = bool(getattr(text_config, "tie_word_embeddings", True))
    provided = lm_state_dict_to_vlm(source.state_dict, model_type=text_config.model_type)
    if vocab > original_vocab:
        for key in ("model.language_model.embeddings.weight", "lm_head.weight"):
            provided[key] = common.grow_rows(provided[key], vocab)
        if tied:
            provided["lm_head.weight"] = provided["model.language_model.embeddings.weight"]
        report.notes.append(
            f"vocabulary grown {original_vocab} -> {vocab}; new rows = mean of the existing rows"
        )

    vision_dir = resolve_source(vision, "--vision") if vision else None
    vision_source = load_vision_source(vision_dir) if vision_dir else None
    vcfg, vision_mode, vision_weights, projector_kwargs = _vision_part(
        vision_source, vision_config, vision_mode, text_config.hidden_size, report
    )
    provided.update(vision_weights)
    config = VLMambaConfig(
        vision_config=vcfg,
        text_config=text_config,
        vision_mode=vision_mode,
        image_token_id=image_token_id,
        tie_word_embeddings=tied,
        **projector_kwargs,
    )
    model = VLMambaForConditionalGeneration(config)
    full = model.state_dict()
    full.update(provided)  # provided keys the model lacks stay in, so common.load_checked lists them
    common.load_checked(model, full, "the converted VLMamba weights")
    report.mapped = len(provided) - int(tied)  # a tied lm_head is the embedding matrix
    report.fresh = common.summarize_keys(k for k in model.state_dict() if k not in provided)

    save_dtype = source.dtype if dtype == "auto" else common.DTYPES[dtype]
    model.to(save_dtype)
    source_sd = {k: v.to(save_dtype).float() for k, v in source.state_dict.items()}
    inputs = [p for p in (source_dir, tokenizer_dir, vision_dir) if p is not None]
    with common.staged_output(output, overwrite, inputs) as staging:
        model.save_pretrained(str(staging))
        if tok is not None:
            image_processor = vision_source.image_processor if vision_source else None
            note = common.save_tokenizer_and_processor(
                staging, tok, vcfg.image_size, config.num_image_tokens, image_token, image_processor
            )
            report.notes += [note] if note else []
        else:
            report.notes.append("no tokenizer: none saved (pass --tokenizer to save one with a processor)")
        converted = VLMambaForConditionalGeneration.from_pretrained(str(staging), dtype=torch.float32).eval()
        _check_round_trip(converted.state_dict(), model)
        max_diff = verify_text_logits(converted, source.config, source_sd, image_token_id, atol)
        write_model_card(
            staging,
            title=f"VLMamba built on {lm}",
            summary=(
                f"A VLMamba checkpoint whose language model is `{lm}` (text-only logits verified equal to "
                f"transformers' {REFERENCE_MODELS[text_config.model_type].__name__} within {atol:g} in fp32, max "
                f"difference {max_diff:.2e}). The "
                "vision tower and bridger "
                + ("come from " + str(vision) if vision else "are freshly initialised")
                + ": fine-tune before use."
            ),
            metadata=card_metadata(base_model=lm, model_name=Path(str(output)).name),
            sources=report.format(),
            evaluation="Not evaluated after conversion: the bridger must be trained first.",
        )
    print(report.format())
    print(f"saved VLMamba ({vision_mode} vision, {save_dtype}) to {output}")
    return Path(output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Build a VLMamba checkpoint around a pretrained Mamba or Mamba-2 LM (transformers or mamba_ssm format)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--lm",
        required=True,
        help="Mamba or Mamba-2 LM folder (transformers or mamba_ssm format) or a Hub id.",
    )
    parser.add_argument("--output", required=True, help="Output folder (must not exist or be empty).")
    parser.add_argument(
        "--vision", help="A converted Vim folder or a VLMamba checkpoint folder to take the tower from."
    )
    parser.add_argument(
        "--vision-config", help=f"Fresh vision tower: a JSON file or a preset ({', '.join(VISION_PRESETS)})."
    )
    parser.add_argument("--vision-mode", choices=("encoder", "fuyu"), help="Vision mode (default: encoder).")
    parser.add_argument(
        "--image-token", default="<image>", help="The image placeholder token (default <image>)."
    )
    parser.add_argument("--image-token-id", type=int, help="Image token id when SRC has no tokenizer.")
    parser.add_argument("--tokenizer", help="Tokenizer folder or Hub id to use instead of SRC's.")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", *common.DTYPES), help="Saved dtype (auto: the LM's)."
    )
    parser.add_argument(
        "--atol", type=float, default=FP32_ATOL, help="Verification tolerance on fp32 logits."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert_mamba_lm(
            args.lm,
            args.output,
            vision=args.vision,
            vision_config=args.vision_config,
            vision_mode=args.vision_mode,
            image_token=args.image_token,
            image_token_id=args.image_token_id,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            overwrite=args.overwrite,
            atol=args.atol,
        )
    except common.EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a Vision Mamba (Vim, hustvl/Vim) checkpoint into a VLMamba vision tower folder.

    python scripts/convert/convert_vim_to_vlm_mamba.py --checkpoint vim_t_midclstok_76p1acc.pth --output OUT \
        [--use-ema] [--image-size N] [--overwrite]

A Vim checkpoint is a dict with "model" (and "model_ema", "args" an argparse.Namespace, "optimizer", "epoch",
...). It is read with `torch.load(weights_only=True)` allowing only `argparse.Namespace` besides tensors and
plain containers. Vim's key names are VLMamba's vision-tower names (`patch_embed.proj`, `cls_token`, `pos_embed`,
`layers.N.norm`, `layers.N.mixer.*` with the backward scan's `*_b`, `norm_f`), so the conversion is a checked
identity; the classification `head` is dropped and reported. The `VLMambaVisionConfig` is inferred from the
shapes (hidden size, depth, state size, expand, conv kernel, dt rank, patch size, image size from the length of
`pos_embed`). OUT is a `VLMambaVisionModel(config, mode="encoder").save_pretrained` folder plus an image
processor with Vim's ImageNet normalisation; pass it to `convert_mamba_lm_to_vlm_mamba.py --vision OUT`.

Supported: Vim-tiny/small/base with a middle class token (`*_midclstok*` / `*_middle_cls_token*`), RMSNorm,
bidirectional "v2" mixers, absolute position embedding, non-overlapping patches and the stride-8 "+" variants
(overlapping patches: `patch_stride` in the config).
Refused with a clear error: a class token at the head or two class tokens, LayerNorm variants, RoPE,
"v1"/unidirectional mixers, no position embedding.

Shapes cannot tell a stride-8 checkpoint at 224 px from a stride-16 one at 432 px: the stride is read from
`args.model` and `args.input_size` when the checkpoint carries them, or inferred from `--image-size`; without
either, patches are taken as non-overlapping.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch

from vlm_mamba_hf import VLMambaVisionConfig, VLMambaVisionModel

if __package__:
    from . import _common as common
else:  # run as a script (python scripts/convert/...)
    import _common as common

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # Vim's training normalisation (timm's IMAGENET_DEFAULT_*)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The backward scan's own parameters (Vim's bimamba "v2"); conv1d_b.bias only with conv bias.
_BACKWARD_PARAMS = (
    "conv1d_b.weight",
    "x_proj_b.weight",
    "dt_proj_b.weight",
    "dt_proj_b.bias",
    "A_b_log",
    "D_b",
)
_KEY = re.compile(
    r"patch_embed\.proj\.(weight|bias)|cls_token|pos_embed|norm_f\.weight|layers\.\d+\.norm\.weight"
    r"|layers\.\d+\.mixer\.("
    + "|".join(re.escape(p) for p in common.MIXER_PARAMS + _BACKWARD_PARAMS + ("conv1d_b.bias",))
    + ")"
)
_DROPPED = re.compile(r"head\.(weight|bias)")
_UNSUPPORTED_HINTS = (
    (re.compile(r"cls_token_(head|tail)"), "two class tokens (use_double_cls_token) are not supported"),
    (
        re.compile(r"(^|\.)norm(_f)?\.bias$"),
        "LayerNorm variants (rms_norm=False) are not supported: VLMamba uses RMSNorm",
    ),
    (re.compile(r"rope"), "RoPE variants (if_rope=True) are not supported"),
)


def vim_state_dict_to_vision(
    state_dict: dict[str, torch.Tensor], image_size: int | None = None, stride: int | None = None
) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """Vim `VisionMamba` weights -> (VLMambaVisionModel weights, VLMambaVisionConfig kwargs, dropped keys).

    `image_size` (pixels) and `stride` are the checkpoint's training values when known; they are only needed to
    detect overlapping patches (the "+" / stride-8 models), which shapes alone cannot reveal.
    """
    dropped = sorted(k for k in state_dict if _DROPPED.fullmatch(k))
    unknown = sorted(k for k in state_dict if not _KEY.fullmatch(k) and not _DROPPED.fullmatch(k))
    if unknown:
        hints = sorted({hint for k in unknown for pattern, hint in _UNSUPPORTED_HINTS if pattern.search(k)})
        raise ValueError(
            f"{len(unknown)} unknown key(s) in the Vim state dict:\n  "
            + "\n  ".join(unknown)
            + "".join(f"\n{hint}." for hint in hints)
        )
    for required in ("patch_embed.proj.weight", "pos_embed"):
        if required not in state_dict:
            raise ValueError(
                f"The Vim state dict has no {required!r} (if_abs_pos_embed=False is not supported); is it a Vim "
                "checkpoint?"
            )
    weights = {k: v for k, v in state_dict.items() if k not in dropped}

    proj = weights["patch_embed.proj.weight"]
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise ValueError(
            f"patch_embed.proj.weight must be a square Conv2d kernel, got shape {tuple(proj.shape)}."
        )
    hidden, channels, kernel = proj.shape[0], proj.shape[1], proj.shape[2]
    if stride is not None and not 1 <= stride <= kernel:
        raise ValueError(
            f"The patch stride {stride} must be from 1 to the patch embedding's kernel size {kernel} (Vim uses "
            "stride == kernel, or 8 for the '+' models)."
        )

    layer_ids = sorted({int(m.group(1)) for k in weights if (m := re.match(r"layers\.(\d+)\.", k))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise ValueError(f"Expected Vim blocks layers.0..N-1, found block indices {layer_ids}.")
    for i in layer_ids:
        absent = [p for p in _BACKWARD_PARAMS if f"layers.{i}.mixer.{p}" not in weights]
        if absent:
            raise ValueError(
                f"layers.{i}.mixer lacks the backward scan's {absent}: only Vim's bidirectional 'v2' mixer "
                "(bimamba_type='v2') is supported."
            )

    use_cls = "cls_token" in weights
    num_patches = weights["pos_embed"].shape[1] - int(use_cls)
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(
            f"pos_embed has {weights['pos_embed'].shape[1]} positions ({num_patches} patches"
            f"{' + class token' if use_cls else ''}), not a square patch grid."
        )
    if (
        stride is None
        and image_size is not None
        and image_size != grid * kernel
        and grid > 1
        and (image_size - kernel) % (grid - 1) == 0
        and 1 <= (image_size - kernel) // (grid - 1) < kernel
    ):
        stride = (image_size - kernel) // (grid - 1)  # overlapping patches: a "+" model
    stride = kernel if stride is None else stride
    native = kernel + (grid - 1) * stride
    if image_size is not None and image_size != native:
        raise ValueError(
            f"pos_embed holds a {grid}x{grid} patch grid, which with {kernel}px patches every {stride}px means "
            f"{native}px images, not the given image size {image_size}."
        )
    config_kwargs = {
        "image_size": native,
        "patch_size": kernel,
        "patch_stride": None if stride == kernel else stride,
        "num_channels": channels,
        "hidden_size": hidden,
        "num_hidden_layers": len(layer_ids),
        **common.mixer_config_from_weights(weights, "layers.0.mixer.", hidden),
        "use_cls_token": use_cls,
    }
    return weights, config_kwargs, dropped


def load_vim_checkpoint(
    path: str | os.PathLike, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], object]:
    """The "model" (or "model_ema") state dict of a Vim checkpoint, and its training args (or None)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if use_ema:
            raise ValueError(f"--use-ema: {path} is a plain safetensors state dict with no EMA weights.")
        return common.load_safetensors(path), None
    checkpoint = common.torch_load_safely(path, allowed_globals=[argparse.Namespace])
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        key = "model_ema" if use_ema else "model"
        if key not in checkpoint:
            raise ValueError(f"--use-ema: {path} has no 'model_ema' entry (entries: {sorted(checkpoint)}).")
        state_dict = common.require_state_dict(checkpoint[key], f"{path} [{key!r}]")
    elif use_ema:
        raise ValueError(f"--use-ema: {path} is a bare state dict with no 'model_ema' entry.")
    else:
        state_dict = common.require_state_dict(checkpoint, str(path))
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict, args


def _args_stride_and_size(args: object) -> tuple[int | None, int | None, str | None]:
    """(stride, input size, model name) from Vim's training args when present."""
    if args is None:
        return None, None, None
    name = getattr(args, "model", None)
    found = re.search(r"stride(\d+)", name or "")
    size = getattr(args, "input_size", None)
    return (int(found.group(1)) if found else None), (int(size) if size else None), name


def convert_vim(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    use_ema: bool = False,
    image_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Vim checkpoint into a VLMambaVisionModel folder at `output`; returns it."""
    state_dict, args = load_vim_checkpoint(checkpoint, use_ema)
    stride, args_size, model_name = _args_stride_and_size(args)
    if model_name:
        print(f"Vim model: {model_name} (input size {args_size})")
    weights, config_kwargs, dropped = vim_state_dict_to_vision(
        common.to_float32(state_dict), image_size or args_size, stride
    )
    if (
        model_name
        and config_kwargs["use_cls_token"]
        and not re.search(r"midclstok|middle_cls_token", model_name)
    ):
        raise NotImplementedError(
            f"{model_name} puts its class token at the head of the sequence; VLMamba's vision tower places it in "
            "the middle (Vim *_midclstok models). Only middle-class-token checkpoints convert."
        )
    config = VLMambaVisionConfig(**config_kwargs)
    model = VLMambaVisionModel(config, mode="encoder")
    common.load_checked(model, weights, "the Vim weights")
    model.eval()

    with common.staged_output(output, overwrite, inputs=[checkpoint]) as staging:
        model.save_pretrained(str(staging))
        try:
            from vlm_mamba_hf.image_processing_vlm_mamba import VLMambaImageProcessor

            size = {"height": config.image_size, "width": config.image_size}
            VLMambaImageProcessor(
                size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
            ).save_pretrained(str(staging))
        except ImportError as error:
            print(f"note: no image processor saved ({error})")
        reloaded = VLMambaVisionModel.from_pretrained(str(staging)).eval()
        pixels = torch.randn(1, config.num_channels, config.image_size, config.image_size)
        with torch.no_grad():
            diff = (reloaded(pixels).last_hidden_state - model(pixels).last_hidden_state).abs().max().item()
        if diff != 0.0:
            raise common.ConversionError(
                f"The saved vision tower does not reload identically (max diff {diff:.3e})."
            )
    print(f"weights: {'model_ema' if use_ema else 'model'}; config: {config_kwargs}")
    print(f"dropped (classification head, no counterpart): {dropped or 'none'}")
    print(f"saved VLMambaVisionModel to {output}")
    return Path(output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a Vim (Vision Mamba) checkpoint into a VLMamba vision tower folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="Vim .pth checkpoint (or a safetensors state dict)."
    )
    parser.add_argument("--output", required=True, help="Output folder (must not exist or be empty).")
    parser.add_argument(
        "--use-ema", action="store_true", help="Take the 'model_ema' weights instead of 'model'."
    )
    parser.add_argument(
        "--image-size", type=int, help="The checkpoint's training resolution when its args do not record it."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert_vim(args.checkpoint, args.output, args.use_ema, args.image_size, args.overwrite)
    except common.EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a checkpoint of the seed prototype (`vlm_mamba.VLMamba`) into a VLMamba checkpoint.

    python scripts/convert/convert_seed_checkpoint.py --checkpoint seed.pt --output OUT \
        [--lora-alpha A] [--tokenizer DIR] [--image-token "<image>"] [--image-token-id N] [--overwrite]

Source format: the state dict of the seed's `vlm_mamba/model.py` (`torch.save(model.state_dict())`, optionally
wrapped in {"state_dict"|"model_state_dict"|"model": ...}; .pt/.pth/.bin read with `weights_only=True`, or a
.safetensors file):

    vision_processor.patch_embed.{weight,bias}      Conv2d (vision_mode="encoder", `VisionMamba`)
    vision_processor.projection.{weight,bias}       Linear over (p1 p2 c)-flattened patches (vision_mode="fuyu")
    vision_processor.pos_embed                      (1, N, Dv), no class token
    vision_processor.layers.N.<mamba_ssm Mamba>     mixers stacked with no residual and no per-layer norm
    vision_processor.norm.{weight,bias}             LayerNorm (encoder mode)
    bridger.net.{0,2}.{weight,bias}                 Linear(Dv, e*Dv) -> GELU -> Linear(e*Dv, Dt)
    bridger.net.3.{weight,bias}                     LayerNorm on the bridger output
    language_model.embedding.weight                 (V, Dt), scaled by sqrt(Dt) in the seed's forward
    language_model.layers.N.<mamba_ssm Mamba>       mixers stacked with no residual and no per-layer norm
    language_model.norm.{weight,bias}               LayerNorm
    language_model.lm_head.weight                   tied to the embedding
    <...>.in_proj.{linear,lora_down,lora_up}.weight the seed's LoRALinear (when trained with a LoRAConfig)

The names `vision_encoder.` (for `vision_processor.`), a Fuyu `linear` (for `projection`) and `bridger.fc1`/`fc2`
(for `net.0`/`net.2`) are accepted as aliases, following an earlier description of the seed.

Mapping: mixer weights keep their names (mamba_ssm's `Mamba` = VLMamba's mixer); patch embedding, position
embedding, bridger linears and embeddings map one to one; LoRA adapters are merged into `in_proj`
(W + alpha/rank * up @ down; `--lora-alpha` is required because the alpha is not stored in the weights).
What cannot map is reported: the seed had no per-block norms (fresh RMSNorm weights = 1) and no residuals,
the vision mixers were unidirectional (the backward scan `*_b` is fresh), LayerNorm scales become RMSNorm scales
(biases dropped), the bridger's output LayerNorm is dropped, and the seed's sqrt(Dt) embedding scaling does not
exist in VLMamba. The result therefore computes a different function: it is a warm start to fine-tune, not an
equivalent model. The `<image>` token gets a new embedding row (the mean of the others) unless `--image-token-id`
or a `--tokenizer` that already has it says otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch
from transformers import MambaConfig

from vlm_mamba_hf import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaVisionConfig

if __package__:
    from . import _common as common
else:  # run as a script (python scripts/convert/...)
    import _common as common

_ALIASES = (
    (re.compile(r"^vision_encoder\."), "vision_processor."),
    (re.compile(r"^vision_processor\.linear\."), "vision_processor.projection."),
    (re.compile(r"^bridger\.fc1\."), "bridger.net.0."),
    (re.compile(r"^bridger\.fc2\."), "bridger.net.2."),
)
# (seed key pattern, target template or None to drop, why it is dropped or only approximate; None when exact)
_RULES = (
    (
        r"vision_processor\.(patch_embed|projection)\.(weight|bias)",
        r"model.vision_tower.patch_embed.proj.\2",
        None,
    ),
    (r"vision_processor\.pos_embed", "model.vision_tower.pos_embed", None),
    (
        rf"vision_processor\.layers\.(\d+)\.({common.MIXER_PATTERN})",
        r"model.vision_tower.layers.\1.mixer.\2",
        None,
    ),
    (
        r"vision_processor\.norm\.weight",
        "model.vision_tower.norm_f.weight",
        "LayerNorm scale used as the RMSNorm scale",
    ),
    (r"vision_processor\.norm\.bias", None, "LayerNorm bias, RMSNorm has none"),
    (r"bridger\.net\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1", None),
    (r"bridger\.net\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1", None),
    (r"bridger\.net\.3\.(weight|bias)", None, "the bridger's output LayerNorm has no counterpart"),
    (r"language_model\.embedding\.weight", "model.language_model.embeddings.weight", None),
    (
        rf"language_model\.layers\.(\d+)\.({common.MIXER_PATTERN})",
        r"model.language_model.layers.\1.mixer.\2",
        None,
    ),
    (
        r"language_model\.norm\.weight",
        "model.language_model.norm_f.weight",
        "LayerNorm scale used as the RMSNorm scale",
    ),
    (r"language_model\.norm\.bias", None, "LayerNorm bias, RMSNorm has none"),
    (r"language_model\.lm_head\.weight", "lm_head.weight", None),
)
_RULES = tuple((re.compile(pattern), target, why) for pattern, target, why in _RULES)


def unwrap_seed_checkpoint(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded seed checkpoint (bare, or under state_dict/model_state_dict/model)."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    state_dict = common.require_state_dict(obj, source)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def merge_seed_lora(
    state_dict: dict[str, torch.Tensor], lora_alpha: float | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Merge the seed's LoRALinear (`X.linear`, `X.lora_down`, `X.lora_up`) into plain `X.weight`/`X.bias`.

    W' = W + (alpha / rank) * up @ down, with up (out, r) and down (r, in). Returns (state dict, merged names).
    """
    suffix = ".lora_down.weight"
    bases = sorted(k[: -len(suffix)] for k in state_dict if k.endswith(suffix))
    if not bases:
        return dict(state_dict), []
    if lora_alpha is None:
        raise ValueError(
            f"The checkpoint has LoRA adapters on {len(bases)} module(s) (e.g. {bases[0]}); pass --lora-alpha, the "
            "LoRAConfig.alpha it was trained with (scaling = alpha / rank), so they can be merged."
        )
    merged = dict(state_dict)
    for base in bases:
        needed = [f"{base}.linear.weight", f"{base}.lora_down.weight", f"{base}.lora_up.weight"]
        absent = [k for k in needed if k not in merged]
        if absent:
            raise ValueError(f"Incomplete LoRA module {base}: missing {absent}.")
        weight, down, up = (merged.pop(k).float() for k in needed)
        merged[f"{base}.weight"] = weight + (lora_alpha / down.shape[0]) * (up @ down)
        if f"{base}.linear.bias" in merged:
            merged[f"{base}.bias"] = merged.pop(f"{base}.linear.bias")
    return merged, bases


def _layer_count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    if ids != list(range(len(ids))):
        raise ValueError(f"Expected {prefix}0..N-1, found layer indices {ids}.")
    return len(ids)


def _square_grid(num_patches: int, what: str) -> int:
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{what} has {num_patches} positions, not a square patch grid.")
    return grid


def _vision_config(sd: dict[str, torch.Tensor], mode: str, num_channels: int) -> VLMambaVisionConfig:
    """Infer the vision tower's config from the seed's shapes."""
    pos = sd["vision_processor.pos_embed"]
    grid = _square_grid(pos.shape[1], "vision_processor.pos_embed")
    if mode == "encoder":
        conv = sd["vision_processor.patch_embed.weight"]
        hidden, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
        depth = _layer_count(sd, "vision_processor.layers.")
        mixer = common.mixer_config_from_weights(sd, "vision_processor.layers.0.", hidden) if depth else {}
    else:
        weight = sd["vision_processor.projection.weight"]
        hidden, channels, depth, mixer = weight.shape[0], num_channels, 0, {}
        patch = math.isqrt(weight.shape[1] // channels)
        if channels * patch * patch != weight.shape[1]:
            raise ValueError(
                f"vision_processor.projection.weight takes {weight.shape[1]} inputs, not channels x patch x patch with "
                f"{channels} channels; pass the right number of channels."
            )
    return VLMambaVisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        hidden_size=hidden,
        num_hidden_layers=depth,
        use_cls_token=False,
        **mixer,
    )


def seed_state_dict_to_vlm(
    state_dict: dict[str, torch.Tensor],
    lora_alpha: float | None = None,
    image_token_id: int | None = None,
    vocab_size: int | None = None,
    num_channels: int = 3,
) -> tuple[dict[str, torch.Tensor], VLMambaConfig, common.ConversionReport]:
    """Seed `VLMamba` weights -> (VLMambaForConditionalGeneration weights, its config, a report).

    `image_token_id` defaults to a new row after the seed's vocabulary; `vocab_size` (e.g. the tokenizer's
    length) grows the vocabulary further. New rows are the mean of the existing embeddings.
    """
    report = common.ConversionReport()
    sd = dict(state_dict)
    for pattern, replacement in _ALIASES:
        sd = {pattern.sub(replacement, k): v for k, v in sd.items()}
    sd, merged = merge_seed_lora(common.to_float32(sd), lora_alpha)
    if merged:
        report.notes.append(
            f"merged LoRA (alpha {lora_alpha}) into: {', '.join(common.summarize_keys(merged))}"
        )

    if "vision_processor.patch_embed.weight" in sd:
        mode = "encoder"
    elif "vision_processor.projection.weight" in sd:
        mode = "fuyu"
    else:
        raise ValueError(
            "No vision_processor.patch_embed.weight (encoder mode) or vision_processor.projection.weight (fuyu "
            "mode): this is not a seed VLMamba state dict."
        )
    required = ["language_model.embedding.weight", "bridger.net.0.weight", "bridger.net.2.weight"]
    required += ["vision_processor.pos_embed", "language_model.layers.0.A_log"]
    absent = [k for k in required if k not in sd]
    if absent:
        raise ValueError(f"The seed state dict lacks {absent}.")

    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        rule = next(((p, target, why) for p, target, why in _RULES if p.fullmatch(key)), None)
        if rule is None:
            unknown.append(key)
            continue
        pattern, target, why = rule
        if target is None:
            report.dropped.append(f"{key} ({why})")
            continue
        converted[pattern.sub(target, key)] = value
        if why is not None:
            report.approximate.append(f"{key} -> {pattern.sub(target, key)} ({why})")
    common.raise_on_unknown_keys(
        unknown, "the seed state dict", "See this script's docstring for the seed layout."
    )

    vision = _vision_config(sd, mode, num_channels)
    if (
        mode == "encoder"
        and vision.num_hidden_layers == 0
        and "model.vision_tower.norm_f.weight" in converted
    ):
        converted.pop("model.vision_tower.norm_f.weight")
        report.dropped.append(
            "vision_processor.norm.weight (the vision tower has no blocks, so no final norm)"
        )
    embedding = converted["model.language_model.embeddings.weight"]
    seed_vocab, text_hidden = embedding.shape
    text_layers = _layer_count(sd, "language_model.layers.")
    expansion, vision_hidden = sd["bridger.net.0.weight"].shape
    if expansion % vision_hidden:
        raise ValueError(
            f"bridger.net.0 maps {vision_hidden} -> {expansion}, not a multiple of the input width."
        )

    lm_head = converted.pop("lm_head.weight", None)
    tied = lm_head is None or torch.equal(lm_head, embedding)
    if image_token_id is None:
        image_token_id = seed_vocab
        report.notes.append(f"image token: new id {image_token_id} (a new row after the seed's vocabulary)")
    vocab = max(seed_vocab, vocab_size or 0, image_token_id + 1)
    if vocab > seed_vocab:
        converted["model.language_model.embeddings.weight"] = common.grow_rows(embedding, vocab)
        report.notes.append(f"vocabulary grown {seed_vocab} -> {vocab}; new rows = mean of the existing rows")
    converted["lm_head.weight"] = (
        converted["model.language_model.embeddings.weight"] if tied else common.grow_rows(lm_head, vocab)
    )

    text = MambaConfig(
        vocab_size=vocab,
        hidden_size=text_hidden,
        num_hidden_layers=text_layers,
        tie_word_embeddings=tied,
        **common.mixer_config_from_weights(sd, "language_model.layers.0.", text_hidden),
    )
    config = VLMambaConfig(
        vision_config=vision,
        text_config=text,
        vision_mode=mode,
        image_token_id=image_token_id,
        projector_expansion=expansion // vision_hidden,
        projector_hidden_act="gelu",
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        target = VLMambaForConditionalGeneration(config).state_dict()
    common.check_keys_and_shapes(
        converted, {k: v.shape for k, v in target.items()}, "the seed weights", allow_missing=True
    )
    report.mapped = len(converted) - int(tied)
    report.fresh = common.summarize_keys(k for k in target if k not in converted)
    report.notes += [
        f"the seed scaled token embeddings by sqrt({text_hidden}) = {text_hidden**0.5:.2f}; VLMamba does not",
        "the seed stacked mixers with no residual connections or per-block norms; VLMamba blocks are pre-norm "
        "residual (norms freshly set to 1): outputs differ, fine-tune after converting",
    ]
    if mode == "encoder":
        report.notes.append(
            "the seed's vision mixers scanned one way; the backward scan (*_b) is freshly initialised"
        )
    return converted, config, report


def load_seed_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a seed checkpoint file (safetensors, or a weights_only pickle) into a state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return common.load_safetensors(path)
    return unwrap_seed_checkpoint(common.torch_load_safely(path), str(path))


def convert_seed(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    lora_alpha: float | None = None,
    tokenizer: str | None = None,
    image_token: str = "<image>",
    image_token_id: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a seed checkpoint into a VLMamba folder at `output`; returns it."""
    state_dict = load_seed_checkpoint(checkpoint)
    tok = common.load_tokenizer(Path(tokenizer)) if tokenizer else None
    vocab_size, added = None, False
    if tok is not None:
        token_id, added = common.ensure_image_token(tok, image_token)
        if image_token_id is not None and image_token_id != token_id:
            raise ValueError(
                f"--image-token-id {image_token_id} disagrees with the tokenizer's {image_token!r} ({token_id})."
            )
        image_token_id, vocab_size = token_id, len(tok)
    sd, config, report = seed_state_dict_to_vlm(state_dict, lora_alpha, image_token_id, vocab_size)
    if tok is not None:
        if added:
            report.notes.append(
                f"added {image_token!r} to the tokenizer as special token id {image_token_id}"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tok, name, None) is not None:
                setattr(config.text_config, name, getattr(tok, name))

    model = VLMambaForConditionalGeneration(config)
    full = model.state_dict()
    full.update(sd)
    common.load_checked(model, full, "the converted seed weights")
    model.eval()
    with common.staged_output(output, overwrite, inputs=[checkpoint]) as staging:
        model.save_pretrained(str(staging))
        if tok is not None:
            note = common.save_tokenizer_and_processor(
                staging, tok, config.vision_config.image_size, config.num_image_tokens, image_token
            )
            if note:
                report.notes.append(note)
        reloaded = VLMambaForConditionalGeneration.from_pretrained(str(staging), dtype=torch.float32).eval()
        saved = model.state_dict()
        differ = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, saved[k])]
        if differ:
            raise common.ConversionError(f"The saved checkpoint does not reload identically: {differ[:20]}.")
        size = config.vision_config.image_size
        pixels = torch.randn(1, config.vision_config.num_channels, size, size)
        with torch.no_grad():
            logits = reloaded(input_ids=torch.zeros(1, 4, dtype=torch.long), pixel_values=pixels).logits
        if not torch.isfinite(logits).all():
            raise common.ConversionError("The converted model produces non-finite logits on a random image.")
    print(report.format())
    print(f"saved VLMamba ({config.vision_mode} vision) to {output}")
    return Path(output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a checkpoint of the seed prototype (vlm_mamba.VLMamba) into a VLMamba checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="Seed state dict (.pt/.pth/.bin or .safetensors)."
    )
    parser.add_argument("--output", required=True, help="Output folder (must not exist or be empty).")
    parser.add_argument(
        "--lora-alpha", type=float, help="LoRAConfig.alpha, to merge the seed's LoRA adapters."
    )
    parser.add_argument(
        "--tokenizer", help="Tokenizer folder to save with a processor ('<image>' added if missing)."
    )
    parser.add_argument(
        "--image-token", default="<image>", help="The image placeholder token (default <image>)."
    )
    parser.add_argument("--image-token-id", type=int, help="Use this existing id for the image token.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert_seed(
            args.checkpoint,
            args.output,
            lora_alpha=args.lora_alpha,
            tokenizer=args.tokenizer,
            image_token=args.image_token,
            image_token_id=args.image_token_id,
            overwrite=args.overwrite,
        )
    except common.EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

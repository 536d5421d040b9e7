"""Decoding side by side: greedy against image-contrastive decoding (`vlm_mamba_hf.image_contrast`).

Each model is evaluated by the same code (`vlm_mamba_hf.training.evaluate`) twice: greedy, and with
image-contrastive decoding at `--alpha` (plausibility 0.1, the default; the same logits processor for both models; VLMamba
steps the contrast branch's recurrent state, LLaVA recomputes it each step). Metrics: easy-VQA test accuracy
on a seeded subset, caption exact match, BLEU-4 and CIDEr-D on the held-out and test shape splits, and the
seconds each evaluation took (one thread).

    python -m benchmarks.bench_decoding                                       # the built-in default model
    python -m benchmarks.bench_decoding --llava runs/q15/llava/checkpoint-5275   # and a LLaVA checkpoint of
                                                                              # benchmarks.bench_quality

Writes benchmarks/results/decoding.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlm_mamba_hf.image_contrast import DEFAULT_PLAUSIBILITY
from vlm_mamba_hf.modeling_vlm_mamba import VLMambaForConditionalGeneration
from vlm_mamba_hf.processing_vlm_mamba import VLMambaProcessor
from vlm_mamba_hf.training.evaluate import default_model_path, evaluate_all

from .common import RESULTS_DIR, machine_info


def load_llava(path: str, vlmamba_processor: VLMambaProcessor) -> tuple[Any, VLMambaProcessor]:
    """A LLaVA checkpoint of `bench_quality` (same tokenizer and image processor as the recipe's VLMamba),
    with `<image>` expanded to its number of patches."""
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    processor = VLMambaProcessor(
        vlmamba_processor.image_processor, vlmamba_processor.tokenizer, image_seq_length=tokens
    )
    return model, processor


def row(name: str, decoding: str, results: dict[str, Any]) -> str:
    vqa, held, test = (
        results[k] for k in ("easy_vqa_test", "shapes_heldout_captions", "shapes_test_captions")
    )
    seconds = vqa["seconds"] + held["seconds"] + test["seconds"]
    return (
        f"| {name} | {decoding} | {vqa['accuracy']:.1%} | {held['exact_match']:.1%} / {held['bleu4']:.3f} / "
        f"{held['cider_d']:.2f} | {test['exact_match']:.1%} / {test['bleu4']:.3f} / {test['cider_d']:.2f} | "
        f"{seconds:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="VLMamba checkpoint (default: the built-in model)")
    parser.add_argument(
        "--llava", default=None, help="a LLaVA checkpoint folder from benchmarks.bench_quality"
    )
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--vqa-limit", type=int, default=3000)
    parser.add_argument("--caption-scenes", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR / "decoding.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = args.model or default_model_path()
    vlmamba = VLMambaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    models = {"vlmamba": (vlmamba, processor)}
    if args.llava:
        models["llava"] = load_llava(args.llava, processor)

    runs: dict[str, dict[str, Any]] = {}
    lines = [
        "| model | decoding | easy-VQA acc | held-out captions EM / BLEU-4 / CIDEr-D | "
        "test captions EM / BLEU-4 / CIDEr-D | eval seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, (model, model_processor) in models.items():
        for decoding, alpha in (("greedy", 0.0), (f"image contrast {args.alpha:g}", args.alpha)):
            results = evaluate_all(
                model, model_processor, args.vqa_limit, args.caption_scenes, image_contrast=alpha
            )
            runs.setdefault(name, {})[decoding] = results
            lines.append(row(name, decoding, results))
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    out = {
        "benchmark": "decoding",
        "machine": machine_info("cpu", "float32"),
        "models": {"vlmamba": str(path), "llava": args.llava},
        "image_contrast": {"alpha": args.alpha, "plausibility": DEFAULT_PLAUSIBILITY},
        "vqa_limit": args.vqa_limit,
        "caption_scenes": args.caption_scenes,
        "runs": runs,
        "table": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

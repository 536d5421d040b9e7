"""Evaluation of an image-text-to-text model on easy-VQA and on shape-scene captions.

- easy-VQA test accuracy: greedy answer to each test question, exact match after VQA answer normalisation.
- Shape captions ("Describe the image."): exact match, corpus BLEU-4 and CIDEr-D against the canonical
  caption, on the "heldout" split (colour-shape pairs never in a training shape scene) and on the in-distribution
  "test" split.

Decoding is greedy. `image_contrast` (alpha; None: what the checkpoint's generation config says) decodes with
image-contrastive decoding (`vlm_mamba_hf.image_contrast`) instead, through the same logits processor for
VLMamba and for any other image-text model.

Works for any model whose `generate()` takes `input_ids`, `attention_mask` and `pixel_values` as prepared by
`VLMambaProcessor` (VLMamba, and the LLaVA baseline of `benchmarks/bench_quality.py`).

    python -m vlm_mamba_hf.training.evaluate --model path/to/checkpoint [--vqa-limit 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

from ..data.shapes import CAPTION_PROMPT, make_shapes_split
from ..image_contrast import (
    ALPHA_KEY,
    DEFAULT_PLAUSIBILITY,
    PLAUSIBILITY_KEY,
    ImageContrastLogitsProcessor,
)
from ..metrics import caption_exact_match, cider_d, corpus_bleu, vqa_accuracy
from ..modeling_vlm_mamba import VLMambaForConditionalGeneration
from .collator import format_prompt


def default_model_path() -> str:
    """The built-in default checkpoint folder shipped inside the package."""
    return str(Path(__file__).resolve().parent.parent / "default_model")


def contrast_generate_kwargs(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    alpha: float | None,
    plausibility: float = DEFAULT_PLAUSIBILITY,
) -> dict[str, Any]:
    """`generate()` keyword arguments for image-contrastive decoding at `alpha` (None: none, so VLMamba
    follows its generation config): VLMamba (also under PEFT) takes the setting itself, any other model gets
    the logits processor."""
    if alpha is None:
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, VLMambaForConditionalGeneration):
        return {ALPHA_KEY: alpha, PLAUSIBILITY_KEY: plausibility}
    if not alpha:
        return {}
    contrast = ImageContrastLogitsProcessor(
        model, inputs["input_ids"], inputs["pixel_values"], inputs.get("attention_mask"), alpha, plausibility
    )
    return {"logits_processor": LogitsProcessorList([contrast])}


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 64,
    progress: bool = False,
    image_contrast: float | None = None,
    image_contrast_plausibility: float = DEFAULT_PLAUSIBILITY,
) -> list[str]:
    """Greedy answers to `questions` about `images` (one image per question), decoded and stripped; with
    `image_contrast` (alpha), image-contrastive decoding (see the module docstring)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokenizer = processor.tokenizer
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for start in starts:
        prompts = [format_prompt(q, processor.image_token) for q in questions[start : start + batch_size]]
        inputs = processor(
            images=list(images[start : start + batch_size]),
            text=prompts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **contrast_generate_kwargs(model, inputs, image_contrast, image_contrast_plausibility),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def evaluate_easy_vqa(
    model: torch.nn.Module,
    processor: Any,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    image_contrast: float | None = None,
) -> dict[str, Any]:
    """easy-VQA test accuracy (VQA-normalised exact match) on all test questions or a seeded subset."""
    from ..data.easy_vqa import EasyVQADataset

    dataset = EasyVQADataset("test", limit=limit, seed=seed)
    images = [e["image"] for e in dataset.examples]
    questions = [e["question"] for e in dataset.examples]
    references = [e["answer"] for e in dataset.examples]
    start = time.perf_counter()
    predictions = generate_answers(
        model,
        processor,
        images,
        questions,
        max_new_tokens=6,
        batch_size=batch_size,
        progress=progress,
        image_contrast=image_contrast,
    )
    return {
        "accuracy": vqa_accuracy(predictions, references),
        "n": len(questions),
        "skipped_images": dataset.skipped,
        "seconds": time.perf_counter() - start,
        "examples": [
            {"question": q, "answer": a, "prediction": p}
            for q, a, p in list(zip(questions, references, predictions))[:5]
        ],
    }


def evaluate_captions(
    model: torch.nn.Module,
    processor: Any,
    split: str = "heldout",
    n: int = 500,
    seed: int = 0,
    scene_size: int = 64,
    batch_size: int = 64,
    progress: bool = False,
    image_contrast: float | None = None,
) -> dict[str, Any]:
    """Caption exact match, BLEU-4 and CIDEr-D on `n` shape scenes of `split` ("heldout" or "test")."""
    scenes = make_shapes_split(split, n, seed, scene_size)
    references = [s["caption"] for s in scenes]
    start = time.perf_counter()
    predictions = generate_answers(
        model,
        processor,
        [s["image"] for s in scenes],
        [CAPTION_PROMPT] * n,
        max_new_tokens=48,
        batch_size=batch_size,
        progress=progress,
        image_contrast=image_contrast,
    )
    return {
        "exact_match": caption_exact_match(predictions, references),
        "bleu4": corpus_bleu(predictions, references),
        "cider_d": cider_d(predictions, references),
        "n": n,
        "split": split,
        "seconds": time.perf_counter() - start,
        "examples": [{"reference": r, "prediction": p} for r, p in list(zip(references, predictions))[:5]],
    }


def evaluate_all(
    model: torch.nn.Module,
    processor: Any,
    vqa_limit: int | None = None,
    caption_scenes: int = 500,
    scene_size: int = 64,
    progress: bool = False,
    image_contrast: float | None = None,
) -> dict[str, Any]:
    """easy-VQA test accuracy and caption metrics on the held-out and test shape splits."""
    captions = dict(scene_size=scene_size, progress=progress, image_contrast=image_contrast)
    return {
        "easy_vqa_test": evaluate_easy_vqa(
            model, processor, limit=vqa_limit, progress=progress, image_contrast=image_contrast
        ),
        "shapes_heldout_captions": evaluate_captions(model, processor, "heldout", caption_scenes, **captions),
        "shapes_test_captions": evaluate_captions(model, processor, "test", caption_scenes, **captions),
    }


def summary_line(results: dict[str, Any]) -> str:
    """One line: easy-VQA accuracy and the held-out / test caption metrics."""
    vqa = results["easy_vqa_test"]
    held = results["shapes_heldout_captions"]
    test = results["shapes_test_captions"]
    return (
        f"easy-VQA test acc {vqa['accuracy']:.2%} (n={vqa['n']}) | held-out captions EM {held['exact_match']:.2%} "
        f"BLEU-4 {held['bleu4']:.3f} CIDEr-D {held['cider_d']:.3f} | test captions EM {test['exact_match']:.2%} "
        f"BLEU-4 {test['bleu4']:.3f} CIDEr-D {test['cider_d']:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: evaluate a checkpoint folder and print (and optionally save) the metrics."""
    parser = argparse.ArgumentParser(
        prog="vlm-mamba eval", description="Evaluate a checkpoint on easy-VQA and shape captions."
    )
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--vqa-limit", type=int, default=None, help="evaluate a random subset of questions")
    parser.add_argument("--caption-scenes", type=int, default=500, help="scenes per caption split")
    parser.add_argument("--scene-size", type=int, default=64, help="side of the drawn shape scenes (px)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--image-contrast",
        type=float,
        default=None,
        metavar="ALPHA",
        help="image-contrastive decoding at ALPHA (0: greedy; default: the checkpoint's generation config)",
    )
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    args = parser.parse_args(argv)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = args.model or default_model_path()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(
        args.device
    )
    processor = AutoProcessor.from_pretrained(path)
    results = evaluate_all(
        model,
        processor,
        args.vqa_limit,
        args.caption_scenes,
        args.scene_size,
        progress=True,
        image_contrast=args.image_contrast,
    )
    print(summary_line(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()

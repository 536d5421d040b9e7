"""Quality at equal budget: VLMamba's default recipe against an equal-size LLaVA (SigLIP + Llama).

Both models train with the same recipe (`vlm_mamba_hf.training.recipes`): the same tokenizer, the same
training mixture in the same order (same seed), the same collator and chat format, the same optimizer,
schedule, batch size and number of steps, and the same wall-clock budget (whichever ends first); both are
evaluated by the same code (`vlm_mamba_hf.training.evaluate`): easy-VQA test accuracy, caption exact match,
BLEU-4 and CIDEr-D on the held-out and test shape splits.

The LLaVA baseline is `transformers.LlavaForConditionalGeneration` built from configs (no download): a
SigLIP vision tower with the same input size and VLMamba's patch step as its patch size (VLMamba's patches
may overlap, a ViT's cannot, so LLaVA gets at least as many image tokens) and a Llama text model, each sized
to within 10% of the parameters of VLMamba's vision and text parts (the sizes chosen are recorded in the
JSON).

Training throughput is also measured side by side: after a warm-up, both models alternate training
steps (forward + backward + AdamW step) on the same batches; the median examples/s and the ratio are
reported, which holds on a shared machine where the absolute speed of two sequential runs does not.
VLMamba runs twice in the alternation when the fused CPU kernels (`vlm_mamba_hf.cpu_kernels`) build: with
them, and on the pure-PyTorch path.

    python -m benchmarks.bench_quality                        # train LLaVA; VLMamba's row from the default model
    python -m benchmarks.bench_quality --train-vlmamba        # retrain VLMamba too, in the same process
    python -m benchmarks.bench_quality --max-steps 300 --time-budget 600    # a shorter run (recorded)
    python -m benchmarks.bench_quality --recipe tiny --quick  # smoke run

Writes benchmarks/results/quality.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
    set_seed,
)

from vlm_mamba_hf.cpu_kernels import kernels_available_for, set_cpu_kernels_enabled
from vlm_mamba_hf.modeling_vlm_mamba import VLMambaForConditionalGeneration
from vlm_mamba_hf.processing_vlm_mamba import VLMambaProcessor
from vlm_mamba_hf.training.evaluate import default_model_path, evaluate_all
from vlm_mamba_hf.training.recipes import (
    Recipe,
    build_collator,
    build_model_config,
    build_processor,
    build_train_dataset,
    get_recipe,
)
from vlm_mamba_hf.training.train import (
    VLMambaTrainer,
    mixture_time_budget,
    run_focus_stage,
    training_arguments,
)

from .common import RESULTS_DIR, machine_info

HEADS = 4


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def vlmamba_parts(model: VLMambaForConditionalGeneration) -> dict[str, int]:
    """Parameters of the vision tower, the bridger and the language model (embeddings included, tied head)."""
    return {
        "vision": _count(model.model.vision_tower),
        "projector": _count(model.model.multi_modal_projector),
        "text": _count(model.model.language_model),
        "total": _count(model),
    }


def siglip_patch_size(recipe: Recipe) -> int:
    """SigLIP's patch side: VLMamba's patch step (a ViT patch embedding cannot overlap), so that LLaVA sees
    patches at least as fine as VLMamba's (64 tokens for 64 px images in 8 px patches)."""
    return recipe.patch_stride or recipe.patch_size


def _siglip_params(hidden: int, layers: int, intermediate: int, recipe: Recipe) -> int:
    patch = siglip_patch_size(recipe)
    patches = (recipe.image_size // patch) ** 2
    embed = 3 * patch**2 * hidden + hidden + patches * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + hidden + 4 * hidden
    return embed + layers * layer + 2 * hidden


def _llama_params(hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    return vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


def llava_sizes(recipe: Recipe, parts: dict[str, int], vocab: int) -> dict[str, int]:
    """SigLIP and Llama sizes whose parameter counts are closest to VLMamba's vision and text parts.

    The Llama has half as many layers as the Mamba LM (a Mamba layer with expand 2 has about half the
    parameters of a Llama layer), at least one, 4 heads, and the MLP width that matches the count. The
    SigLIP tower has at least one layer (LLaVA reads a hidden state of an encoder layer).
    """
    hidden = recipe.text_hidden_size
    text_layers = max(1, recipe.text_layers // 2)
    per_layer = (parts["text"] - vocab * hidden - hidden) / text_layers
    text_intermediate = max(8, round((per_layer - 4 * hidden * hidden - 2 * hidden) / (3 * hidden)))
    candidates = [
        (v_hidden, v_layers, v_inter)
        for v_hidden in range(4 * HEADS, 4 * recipe.vision_hidden_size + 1, 4 * HEADS)
        for v_layers in range(1, max(1, recipe.vision_layers) + 1)
        for v_inter in range(v_hidden // 2, 4 * v_hidden + 1, 8)
    ]

    def mismatch(candidate: tuple[int, int, int]) -> tuple[float, int, int]:
        count = _siglip_params(*candidate, recipe)
        # The closest count (to 1%); among near-ties the widest, deepest tower.
        return round(abs(count - parts["vision"]) / parts["vision"], 2), -candidate[0], -candidate[1]

    best = min(candidates, key=mismatch)
    v_hidden, v_layers, v_inter = best
    return {
        "vision_hidden_size": v_hidden,
        "vision_layers": v_layers,
        "vision_intermediate_size": v_inter,
        "text_hidden_size": hidden,
        "text_layers": text_layers,
        "text_intermediate_size": text_intermediate,
    }


def build_llava(recipe: Recipe, tokenizer, sizes: dict[str, int]) -> LlavaForConditionalGeneration:
    """LLaVA (SigLIP tower + Llama) with the recipe's image geometry and tokenizer."""
    vision = SiglipVisionConfig(
        image_size=recipe.image_size,
        patch_size=siglip_patch_size(recipe),
        hidden_size=sizes["vision_hidden_size"],
        num_hidden_layers=sizes["vision_layers"],
        num_attention_heads=HEADS,
        intermediate_size=sizes["vision_intermediate_size"],
        vision_use_head=False,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["text_hidden_size"],
        num_hidden_layers=sizes["text_layers"],
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=sizes["text_intermediate_size"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(recipe.image_size // siglip_patch_size(recipe)) ** 2,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    set_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def llava_parts(model: LlavaForConditionalGeneration) -> dict[str, int]:
    return {
        "vision": _count(model.model.vision_tower),
        "projector": _count(model.model.multi_modal_projector),
        "text": _count(model.model.language_model),
        "total": _count(model),
    }


def train_and_evaluate(
    name: str, model, recipe: Recipe, processor, dataset, output_dir: Path, progress: bool
) -> dict[str, Any]:
    """The recipe's Trainer run (same args, collator, data, budget) and the shared evaluation."""
    collator = build_collator(recipe, processor)
    focus = run_focus_stage(recipe, model, collator, output_dir / name, disable_tqdm=not progress)
    args = training_arguments(recipe, str(output_dir / name), save_strategy="no", disable_tqdm=not progress)
    budget = mixture_time_budget(recipe, focus)
    trainer = VLMambaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[budget] if budget else [],
        vision_lr_scale=recipe.vision_lr_scale,
    )
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    steps = trainer.state.global_step
    results = evaluate_all(
        model,
        processor,
        recipe.eval_vqa_limit,
        recipe.eval_caption_scenes,
        recipe.scene_size,
        progress=progress,
    )
    return {
        "focus_stage": focus,
        "train_steps": steps,
        "train_seconds": seconds,
        "train_examples_per_second": steps * recipe.batch_size * recipe.grad_accum / seconds,
        "stopped_by_time_budget": bool(budget and budget.stopped_at_step is not None),
        "train_loss": output.training_loss,
        "final_logged_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
        ),
        "eval": results,
    }


def llava_processor(recipe: Recipe, processor: VLMambaProcessor) -> VLMambaProcessor:
    """The same tokenizer and image processor, with `<image>` expanded to LLaVA's number of patches."""
    tokens = (recipe.image_size // siglip_patch_size(recipe)) ** 2
    return VLMambaProcessor(processor.image_processor, processor.tokenizer, image_seq_length=tokens)


def side_by_side_throughput(
    models: dict[str, torch.nn.Module],
    processors: dict[str, VLMambaProcessor],
    recipe: Recipe,
    dataset,
    steps: int,
    warmup: int = 2,
) -> dict[str, Any]:
    """Alternate training steps of the models on batches of the same examples; median examples/s and ratios."""
    examples = [
        [dataset[(i * recipe.batch_size + j) % len(dataset)] for j in range(recipe.batch_size)]
        for i in range(warmup + steps)
    ]
    collators = {name: build_collator(recipe, processors[name]) for name in models}
    batches = {name: [collators[name](e) for e in examples] for name in models}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    # VLMamba a second time with the fused CPU kernels off: the pure-PyTorch path, in the same alternation.
    runs = [(name, name, None) for name in models]
    if "vlmamba" in models and kernels_available_for(torch.empty(0)):
        runs.insert(1, ("vlmamba", "vlmamba_pytorch_path", False))
        times["vlmamba_pytorch_path"] = []
    for index in range(len(examples)):
        for name, key, kernels in runs:
            model, batch = models[name], batches[name][index]
            model.train()
            set_cpu_kernels_enabled(kernels)
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            if index >= warmup:
                times[key].append(time.perf_counter() - start)
            set_cpu_kernels_enabled(None)
    out = {
        name: {
            "median_step_seconds": statistics.median(t),
            "examples_per_second": recipe.batch_size / statistics.median(t),
        }
        for name, t in times.items()
    }
    for key in [k for k in out if k.startswith("vlmamba")]:
        out[f"ratio_{key}_over_llava"] = out[key]["examples_per_second"] / out["llava"]["examples_per_second"]
    out["threads"] = torch.get_num_threads()
    out["steps"] = steps
    return out


def _row(name: str, run: dict[str, Any]) -> str:
    ev = run["eval"]
    held, test = ev["shapes_heldout_captions"], ev["shapes_test_captions"]
    focus = run.get("focus_stage") or {"steps": 0, "seconds": 0.0}
    steps = f"{focus['steps']} + {run['train_steps']}" if focus["steps"] else f"{run['train_steps']}"
    minutes = (focus["seconds"] + run["train_seconds"]) / 60
    return (
        f"| {name} | {run['parameters']['total'] / 1e6:.2f}M | {steps} | {minutes:.1f} | "
        f"{ev['easy_vqa_test']['accuracy']:.1%} | {held['exact_match']:.1%} | {held['bleu4']:.3f} | "
        f"{held['cider_d']:.2f} | {test['exact_match']:.1%} | {test['bleu4']:.3f} | {test['cider_d']:.2f} |"
    )


# Recipe fields added after some stored runs, with the value that gives those runs' behaviour (for
# --reuse-llava: a stored recipe without the field ran as if it had this value).
RECIPE_FIELDS_ADDED: dict[str, Any] = {"factored_patches": False, "focus_scenes": False}


def recipe_differences(earlier: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The recipe fields (as stored in JSON) in which an earlier run differs from the current recipe; a field
    missing from the earlier run counts as its `RECIPE_FIELDS_ADDED` value, or as a difference if it has none."""
    earlier = {**RECIPE_FIELDS_ADDED, **earlier}
    missing = object()
    return sorted(
        k for k in set(earlier) | set(current) if earlier.get(k, missing) != current.get(k, missing)
    )


# The throughput alternation's VLMamba without `foreground_channel`, when the recipe has it.
NO_FOREGROUND = "vlmamba_without_foreground_channel"
# The VLMamba variants the alternation may time besides the default model, as the table names them.
_VARIANT_LABELS = {
    "vlmamba_pytorch_path": "VLMamba without the fused CPU kernels (pure-PyTorch path)",
    NO_FOREGROUND: "VLMamba without the foreground channel",
}


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| model | params | steps (focus + mixture) | train min | easy-VQA acc | held-out EM | held-out BLEU-4 | held-out CIDEr-D "
        "| test EM | test BLEU-4 | test CIDEr-D |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, result["runs"][name]) for name in ("vlmamba", "llava") if name in result["runs"]]
    speed = result.get("throughput")
    if speed:
        lines.append(
            f"\nTraining throughput, side by side: VLMamba {speed['vlmamba']['examples_per_second']:.1f} ex/s, "
            f"LLaVA {speed['llava']['examples_per_second']:.1f} ex/s (ratio {speed['ratio_vlmamba_over_llava']:.2f}x)."
        )
        for key, label in _VARIANT_LABELS.items():
            if key in speed:
                lines.append(
                    f"{label}: {speed[key]['examples_per_second']:.1f} ex/s "
                    f"({speed[f'ratio_{key}_over_llava']:.2f}x LLaVA)."
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps (recorded)")
    parser.add_argument("--time-budget", type=float, default=None, help="override the recipe's budget (s)")
    parser.add_argument(
        "--train-vlmamba", action="store_true", help="retrain VLMamba instead of reading its run"
    )
    parser.add_argument(
        "--vlmamba-summary", default=str(Path(default_model_path()) / "training_summary.json")
    )
    parser.add_argument(
        "--reuse-llava", default=None, help="take the LLaVA run from this earlier quality.json (same recipe)"
    )
    parser.add_argument("--throughput-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, small evaluation")
    parser.add_argument("--output-dir", default="runs/bench_quality")
    parser.add_argument("--out", default=str(RESULTS_DIR / "quality.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides: dict[str, Any] = {"max_steps": args.max_steps, "time_budget_s": args.time_budget}
    if args.quick:
        overrides.update(max_steps=args.max_steps or 4, eval_vqa_limit=64, eval_caption_scenes=16)
    recipe = get_recipe(args.recipe, **overrides)
    processor = build_processor(recipe)
    tokenizer = processor.tokenizer
    dataset = build_train_dataset(recipe)
    set_seed(recipe.seed)
    vlmamba = VLMambaForConditionalGeneration(build_model_config(recipe, tokenizer))
    parts = vlmamba_parts(vlmamba)
    sizes = llava_sizes(recipe, parts, len(tokenizer))
    llava = build_llava(recipe, tokenizer, sizes)
    lparts = llava_parts(llava)
    print(f"VLMamba parameters {parts}\nLLaVA parameters   {lparts}  sizes {sizes}", flush=True)

    processors = {"vlmamba": processor, "llava": llava_processor(recipe, processor)}
    timed = {"vlmamba": vlmamba, "llava": llava}
    if recipe.foreground_channel:  # what the channel costs, in the same alternation
        set_seed(recipe.seed)
        plain = recipe.replace(foreground_channel=False)
        timed[NO_FOREGROUND] = VLMambaForConditionalGeneration(build_model_config(plain, tokenizer))
        processors[NO_FOREGROUND] = processor
    throughput = side_by_side_throughput(timed, processors, recipe, dataset, args.throughput_steps)
    print(f"throughput: {json.dumps(throughput)}", flush=True)

    runs: dict[str, Any] = {}
    recipe_as_stored = json.loads(json.dumps(recipe.to_dict()))  # as JSON files hold it: tuples are lists
    output_dir = Path(args.output_dir)
    if args.train_vlmamba:
        set_seed(recipe.seed)
        model = VLMambaForConditionalGeneration(build_model_config(recipe, tokenizer))
        runs["vlmamba"] = train_and_evaluate("vlmamba", model, recipe, processor, dataset, output_dir, True)
        runs["vlmamba"]["source"] = "trained in this run"
    else:
        summary = json.loads(Path(args.vlmamba_summary).read_text())
        runs["vlmamba"] = {
            "train_steps": summary["steps"],
            "train_seconds": summary["train_seconds"],
            "train_examples_per_second": summary["examples_per_second"],
            "stopped_by_time_budget": summary["stopped_by_time_budget"],
            "train_loss": summary["train_loss"],
            "final_logged_loss": summary["final_logged_loss"],
            "focus_stage": summary.get("focus_stage", {"steps": 0, "seconds": 0.0}),
            "eval": summary["eval"],
            "source": f"the default model's training run ({args.vlmamba_summary})",
        }
        runs["vlmamba"]["recipe_differences"] = {
            k: v for k, v in summary["recipe"].items() if recipe_as_stored.get(k) != v
        }
    runs["vlmamba"]["parameters"] = parts
    if args.reuse_llava:
        earlier = json.loads(Path(args.reuse_llava).read_text())
        differing = recipe_differences(earlier["recipe"], recipe_as_stored)
        if differing:
            raise SystemExit(
                f"--reuse-llava: {args.reuse_llava} was run with another recipe (fields differing: {differing})."
            )
        runs["llava"] = earlier["runs"]["llava"]
        runs["llava"]["source"] = f"reused from {args.reuse_llava} ({earlier.get('date', 'earlier run')})"
    else:
        runs["llava"] = train_and_evaluate(
            "llava", llava, recipe, processors["llava"], dataset, output_dir, True
        )
        runs["llava"]["source"] = "trained in this run"
    runs["llava"]["parameters"] = lparts
    runs["llava"]["sizes"] = sizes

    result = {
        "benchmark": "quality",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info("cpu", "float32"),
        "recipe": recipe.to_dict(),
        "runs": runs,
        "throughput": throughput,
    }
    result["table"] = markdown_table(result)
    out = Path(args.out)
    out = out if out.suffix == ".json" else out.with_name(out.name + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(result["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

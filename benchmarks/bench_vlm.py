"""End-to-end VLM benchmark: VLMamba against a LLaVA of its size, both through `pipeline("image-text-to-text")`.

Cases (BENCHMARKS.md, "end to end"): caption one image (16 new tokens), answer one question about it
(8 new tokens), and a long prompt (about 2k text tokens plus the image, 8 new tokens), batch 1. Both
models are saved with their processors to temporary folders and loaded back by the pipeline, so the
timed call is what a user runs: image preprocessing, tokenisation, `generate`, decoding.

vlm-tiny is the shipped default model's config (`vlm_mamba_hf/default_model/config.json`, random
weights) when that folder exists, else a small config (vision 64 px, patch 8, hidden 128, 4 layers; text
hidden 256, 4 layers, vocab 512). The LLaVA has a SigLIP vision tower of the same width, patch size and
image size and a Llama text model, each within 10% of ours in parameters, the same tokenizer (`<image>`
included), the same chat template and the same number of image tokens per image.

    python -m benchmarks.bench_vlm --quick          # smoke run, a few seconds of timing
    python -m benchmarks.bench_vlm                  # full run -> benchmarks/results/vlm_cpu.json
    python -m benchmarks.bench_vlm --device cuda --dtype bfloat16   # -> results/vlm_<gpu>.json

On CUDA a third candidate, ours_cuda_graphs, runs the same pipeline with
generate_kwargs={"cache_implementation": "static"}: a fixed-shape state and a compiled (CUDA-graph) decode
step. Decode and prefill at batch 1 and 8, memory and the bandwidth bound are `bench_gpu --suite vlm`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: nothing may download

import numpy as np
import PIL.Image
import torch
from transformers import (
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MambaConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
    pipeline,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.utils import logging as hf_logging

import vlm_mamba_hf
from benchmarks.common import (
    DTYPES,
    card_slug,
    compare,
    format_table,
    machine_info,
    param_count,
    ratio,
    wait_for_quiet_machine,
    write_json,
)
from vlm_mamba_hf import (
    VLMambaConfig,
    VLMambaForConditionalGeneration,
    VLMambaImageProcessor,
    VLMambaProcessor,
    VLMambaVisionConfig,
)
from vlm_mamba_hf.processing_vlm_mamba import DEFAULT_CHAT_TEMPLATE
from vlm_mamba_hf.tokenizer_utils import build_tokenizer

OURS, OURS_CG, LLAVA = "ours", "ours_cuda_graphs", "llava"
LABELS = {
    OURS: "VLMambaForConditionalGeneration (Mamba vision tower, bridger, Mamba language model)",
    OURS_CG: "the same pipeline with generate(cache_implementation='static'): CUDA-graph decoding (CUDA only)",
    LLAVA: "transformers LlavaForConditionalGeneration (SigLIP vision tower, SDPA; Llama text model, SDPA)",
}
DEFAULT_MODEL_DIR = Path(vlm_mamba_hf.__file__).parent / "default_model"
PARAM_TOLERANCE = 0.10  # each LLaVA part must be within 10% of ours
HEAD_DIM = 64
CORPUS_SENTENCES = (
    "A red circle is on the left of a blue square.",
    "What color is the shape? The shape is green.",
    "How many triangles are there in the image? There are two triangles.",
    "Is there a yellow rectangle near the top right corner? Yes, there is.",
    "The small gray square sits below the large teal circle.",
    "Describe the image: three shapes, one brown, one black and one white, on a plain background.",
)
CAPTION_PROMPT = "<image>"
VQA_QUESTION = "What color is the shape on the left?"


# ----------------------------------------------------------------------------------------------------------
# Ours: the shipped default config, or the small one
# ----------------------------------------------------------------------------------------------------------


def small_config(tokenizer) -> VLMambaConfig:
    """vlm-tiny when no default model ships: vision 64 px patch 8 hidden 128 x4, text hidden 256 x4, vocab 512."""
    return VLMambaConfig(
        vision_config=VLMambaVisionConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4),
        text_config=MambaConfig(
            vocab_size=512,
            hidden_size=256,
            num_hidden_layers=4,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.image_token_id,
    )


def ours_config_and_processor() -> tuple[VLMambaConfig, VLMambaProcessor, str]:
    """The default model's config (and processor, when it ships one), else the small config and a new tokenizer."""
    default = (
        VLMambaConfig.from_pretrained(DEFAULT_MODEL_DIR)
        if (DEFAULT_MODEL_DIR / "config.json").exists()
        else None
    )
    # A default whose tower has no Mamba layer (Fuyu mode, or a bare patch embedding) is too small for any
    # attention tower to match in size: use the small config.
    if (
        default is not None
        and default.vision_mode == "encoder"
        and default.vision_config.num_hidden_layers > 0
    ):
        config = default
        try:
            processor = AutoProcessor.from_pretrained(DEFAULT_MODEL_DIR)
            return config, processor, f"{DEFAULT_MODEL_DIR} (config and processor; random weights)"
        except (OSError, ValueError):
            tokenizer = build_tokenizer(CORPUS_SENTENCES * 50, vocab_size=config.text_config.vocab_size)
            source = f"{DEFAULT_MODEL_DIR}/config.json (random weights; benchmark tokenizer)"
    else:
        tokenizer = build_tokenizer(CORPUS_SENTENCES * 50, vocab_size=512)
        config = small_config(tokenizer)
        source = (
            "small config (the default model is missing or has a layerless tower that LLaVA cannot match)"
        )
    size = config.vision_config.image_size
    processor = VLMambaProcessor(
        VLMambaImageProcessor(size={"height": size, "width": size}),
        tokenizer,
        image_seq_length=config.num_image_tokens,
    )
    return config, processor, source


# ----------------------------------------------------------------------------------------------------------
# The LLaVA match
# ----------------------------------------------------------------------------------------------------------


def meta_param_count(build: Callable[[], torch.nn.Module]) -> int:
    """Parameter count of `build()` without allocating or initialising any weights."""
    with torch.device("meta"):
        return param_count(build())


def match_params(
    count: Callable[[int, int], int],
    target: int,
    base_layers: int,
    base_intermediate: int,
    multiple: int = 32,
) -> tuple[int, int, int]:
    """(layers, intermediate_size, params) nearest `target`: the depth nearest it at `base_intermediate`, then
    the MLP width (a multiple of `multiple`) solved for the remainder, since params are linear in it."""
    per_layer = count(base_layers + 1, base_intermediate) - count(base_layers, base_intermediate)
    layers = max(1, round(base_layers + (target - count(base_layers, base_intermediate)) / per_layer))
    at_base = count(layers, base_intermediate)
    per_unit = (count(layers, base_intermediate + multiple) - at_base) / multiple
    intermediate = base_intermediate + (target - at_base) / per_unit
    intermediate = max(multiple, int(round(intermediate / multiple)) * multiple)
    return layers, intermediate, count(layers, intermediate)


def siglip_config(vision: VLMambaVisionConfig, layers: int, intermediate: int) -> SiglipVisionConfig:
    """SigLIP vision tower of our tower's width, patch and image size (no pooling head; LLaVA does not use it)."""
    return SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, vision.hidden_size // HEAD_DIM),
        intermediate_size=intermediate,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        num_channels=vision.num_channels,
        vision_use_head=False,
        attn_implementation="sdpa",
    )


def llama_config(text: MambaConfig, layers: int, intermediate: int, tie: bool) -> LlamaConfig:
    """Llama of our text model's width and vocabulary, SDPA attention."""
    return LlamaConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, text.hidden_size // HEAD_DIM),
        intermediate_size=intermediate,
        tie_word_embeddings=tie,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        attn_implementation="sdpa",
    )


def part_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the vision tower, the projector and the text model (embeddings and head, tied once)."""
    vision = param_count(model.model.vision_tower)
    projector = param_count(model.model.multi_modal_projector)
    total = param_count(model)
    return {"vision": vision, "projector": projector, "text": total - vision - projector, "total": total}


def matched_llava_config(
    config: VLMambaConfig, ours_parts: dict[str, int]
) -> tuple[LlavaConfig, dict[str, Any]]:
    """LLaVA with a SigLIP tower and a Llama text model each within 10% of ours, and the same image tokens.

    SigLIP has no class token, so the "full" feature strategy keeps every patch: (image / patch)^2 image
    tokens, as ours has when it drops its class token. The Llama starts from half our layer count (a Mamba
    layer is about half a transformer layer) and 4x / 3x MLPs, then the MLP width is solved for the match.
    """
    vision, text = config.vision_config, config.text_config
    v_layers, v_mlp, v_params = match_params(
        lambda n, i: meta_param_count(lambda: SiglipVisionModel(siglip_config(vision, n, i))),
        ours_parts["vision"],
        base_layers=max(1, vision.num_hidden_layers // 2),
        base_intermediate=4 * vision.hidden_size,
    )
    tie = config.tie_word_embeddings
    t_layers, t_mlp, t_params = match_params(
        lambda n, i: meta_param_count(lambda: LlamaForCausalLM(llama_config(text, n, i, tie))),
        ours_parts["text"],
        base_layers=max(1, text.num_hidden_layers // 2),
        base_intermediate=3 * text.hidden_size,
    )
    llava_config = LlavaConfig(
        vision_config=siglip_config(vision, v_layers, v_mlp),
        text_config=llama_config(text, t_layers, t_mlp, tie),
        image_token_id=config.image_token_id,
        image_seq_length=config.num_image_tokens,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act=config.projector_hidden_act,
        tie_word_embeddings=tie,
    )
    record = {
        "vision": {
            "num_hidden_layers": v_layers,
            "intermediate_size": v_mlp,
            "params": v_params,
            "relative_to_ours": v_params / ours_parts["vision"] - 1,
        },
        "text": {
            "num_hidden_layers": t_layers,
            "intermediate_size": t_mlp,
            "params": t_params,
            "relative_to_ours": t_params / ours_parts["text"] - 1,
        },
    }
    for part in ("vision", "text"):
        if abs(record[part]["relative_to_ours"]) > PARAM_TOLERANCE:
            raise AssertionError(f"No LLaVA {part} model within 10% of ours: {record[part]}.")
    return llava_config, record


def llava_processor(processor: VLMambaProcessor, config: VLMambaConfig) -> LlavaProcessor:
    """LlavaProcessor with ours' tokenizer and chat template and a SigLIP image processor of the same size and
    normalisation; `patch_size` with no additional tokens expands `<image>` to as many tokens as ours."""
    ours_images = processor.image_processor
    image_processor = SiglipImageProcessorPil(
        size=dict(ours_images.size),
        image_mean=list(ours_images.image_mean),
        image_std=list(ours_images.image_std),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=processor.chat_template or DEFAULT_CHAT_TEMPLATE,
        image_token=processor.image_token,
    )


# ----------------------------------------------------------------------------------------------------------
# Inputs and cases
# ----------------------------------------------------------------------------------------------------------


def random_image(seed: int, size: int = 256) -> PIL.Image.Image:
    """A random RGB image (never blank); each processor resizes it to its model's input size."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def chat_prompt(processor: VLMambaProcessor, text: str) -> str:
    """The rendered chat prompt for one image and `text`, ending with the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def long_text(tokenizer, n_tokens: int) -> str:
    """Corpus sentences, in turn, until the text is at least `n_tokens` tokens long."""
    sentences: list[str] = []
    while len(tokenizer.encode(" ".join(sentences), add_special_tokens=False)) < n_tokens:
        sentences.append(CORPUS_SENTENCES[len(sentences) % len(CORPUS_SENTENCES)])
    return " ".join(sentences)


def build_cases(args, processor: VLMambaProcessor) -> dict[str, dict[str, Any]]:
    """Prompt and number of new tokens per case."""
    return {
        "caption": {"prompt": CAPTION_PROMPT, "new_tokens": args.caption_tokens},
        "vqa": {"prompt": chat_prompt(processor, VQA_QUESTION), "new_tokens": args.vqa_tokens},
        "long_prompt": {
            "prompt": chat_prompt(
                processor, long_text(processor.tokenizer, args.long_tokens) + " " + VQA_QUESTION
            ),
            "new_tokens": args.vqa_tokens,
        },
    }


def generate_kwargs(new_tokens: int) -> dict[str, Any]:
    """Greedy, exactly `new_tokens` new tokens (min = max, so an early EOS cannot shorten one model's run)."""
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}


def pipeline_call(
    pipe, image: PIL.Image.Image, prompt: str, new_tokens: int, static_cache: bool = False
) -> Callable[[], Any]:
    """One end-to-end pipeline call: preprocess, generate, decode (on a fixed-shape state: CUDA graphs)."""
    kwargs = generate_kwargs(new_tokens)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    return lambda: pipe(images=image, text=prompt, generate_kwargs=kwargs, return_full_text=False)


def check_inputs_and_lengths(
    models: dict[str, torch.nn.Module], processors: dict[str, Any], image, prompt: str, new_tokens: int
) -> dict[str, Any]:
    """Both processors give the same input ids, and both models generate exactly `new_tokens` tokens."""
    inputs = {name: processors[name](images=image, text=prompt, return_tensors="pt") for name in models}
    ids = {name: x["input_ids"] for name, x in inputs.items()}
    if not torch.equal(ids[OURS], ids[LLAVA]):
        raise AssertionError(
            f"The processors disagree on the prompt: {ids[OURS].shape[1]} vs {ids[LLAVA].shape[1]} tokens."
        )
    image_tokens = int((ids[OURS] == processors[OURS].image_token_id).sum())
    generated = {}
    with torch.inference_mode():
        for name, model in models.items():
            x = {k: v.to(model.device) for k, v in inputs[name].items()}
            x["pixel_values"] = x["pixel_values"].to(model.dtype)
            out = model.generate(**x, **generate_kwargs(new_tokens))
            generated[name] = out.shape[1] - ids[name].shape[1]
    if set(generated.values()) != {new_tokens}:
        raise AssertionError(f"Expected {new_tokens} new tokens from each model, got {generated}.")
    return {"prompt_tokens": ids[OURS].shape[1], "image_tokens": image_tokens, "new_tokens": new_tokens}


def run_cases(args, pipes, models, processors, cases) -> dict[str, Any]:
    """Seconds per pipeline call, ours and LLaVA alternating on the same image and prompt."""
    out: dict[str, Any] = {}
    for i, (case, spec) in enumerate(cases.items()):
        image = random_image(seed=i)
        record = check_inputs_and_lengths(models, processors, image, spec["prompt"], spec["new_tokens"])
        candidates = {
            name: pipeline_call(pipe, image, spec["prompt"], spec["new_tokens"])
            for name, pipe in pipes.items()
        }
        if args.device == "cuda":
            candidates[OURS_CG] = pipeline_call(pipes[OURS], image, spec["prompt"], spec["new_tokens"], True)
        start = time.time()
        timings = compare(candidates, args.device, repeats=args.repeats, warmup=args.warmup)
        seconds = {name: t["median_s"] for name, t in timings.items()}
        out[case] = {
            **record,
            "seconds": seconds,
            "ratio_vs_llava": ratio(seconds[LLAVA], seconds[OURS]),
            **(
                {"ratio_cuda_graphs_vs_llava": ratio(seconds[LLAVA], seconds[OURS_CG])}
                if OURS_CG in seconds
                else {}
            ),
            "timings": timings,
            "prompt_preview": spec["prompt"][:80] + ("..." if len(spec["prompt"]) > 80 else ""),
        }
        print(
            f"  {case} ({record['prompt_tokens']} prompt tokens, {record['new_tokens']} new): "
            + ", ".join(f"{n} {s:.3f}s" for n, s in seconds.items())
            + f", llava/ours {out[case]['ratio_vs_llava']:.2f} ({time.time() - start:.0f}s)",
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    graphs = any(OURS_CG in r["seconds"] for r in results["cases"].values())
    rows = [
        [
            case,
            r["prompt_tokens"],
            r["new_tokens"],
            r["seconds"][OURS],
            *([r["seconds"].get(OURS_CG)] if graphs else []),
            r["seconds"][LLAVA],
            r["ratio_vs_llava"],
            *([r.get("ratio_cuda_graphs_vs_llava")] if graphs else []),
        ]
        for case, r in results["cases"].items()
    ]
    print(
        "\nEnd to end via pipeline('image-text-to-text'), batch 1 (seconds per call; ratio = llava s / ours s)"
    )
    headers = ["case", "prompt tokens", "new tokens", "ours s", *(["ours cg s"] if graphs else [])]
    headers += ["llava s", "llava/ours", *(["llava/ours cg"] if graphs else [])]
    print(format_table(headers, rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument(
        "--quick", action="store_true", help="few new tokens, a short 'long' prompt, 1 repeat"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per model and case (default 5; 1 with --quick)"
    )
    parser.add_argument("--long-tokens", type=int, help="text tokens of the long prompt (default 2048)")
    parser.add_argument(
        "--wait-load",
        type=float,
        help="first wait until the 1-minute load average is below this (shared machines)",
    )
    parser.add_argument("--wait-minutes", type=float, default=40.0, help="give up waiting after this long")
    parser.add_argument("--out", help="results name or path (default vlm_<device>[_quick])")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 5)
    args.warmup = 1
    args.long_tokens = args.long_tokens or (128 if quick else 2048)
    args.caption_tokens = 4 if quick else 16
    args.vqa_tokens = 2 if quick else 8
    device_name = args.device
    if args.device == "cuda" and torch.cuda.is_available():
        device_name = card_slug(torch.cuda.get_device_name(0))
    args.out = args.out or f"vlm_{device_name}" + ("_quick" if quick else "")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    device, dtype = args.device, DTYPES[args.dtype]
    load = wait_for_quiet_machine(args.wait_load, args.wait_minutes)
    started = time.time()
    config, processor, source = ours_config_and_processor()
    torch.manual_seed(0)
    ours = VLMambaForConditionalGeneration(config).eval()
    ours_parts = part_params(ours)
    llava_cfg, match = matched_llava_config(config, ours_parts)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(llava_cfg).eval()
    llava_parts = part_params(llava)
    assert (
        llava_parts["vision"] == match["vision"]["params"] and llava_parts["text"] == match["text"]["params"]
    )
    processors = {OURS: processor, LLAVA: llava_processor(processor, config)}
    print(f"ours:  {source}")
    for name, parts in ((OURS, ours_parts), (LLAVA, llava_parts)):
        print(f"  {name:5s} params: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    print(
        f"  llava vision {match['vision']['relative_to_ours']:+.1%} ({match['vision']['num_hidden_layers']} layers, "
        f"MLP {match['vision']['intermediate_size']}), text {match['text']['relative_to_ours']:+.1%} "
        f"({match['text']['num_hidden_layers']} layers, MLP {match['text']['intermediate_size']})"
    )

    results: dict[str, Any] = {
        "machine": {**machine_info(device, args.dtype), "load_wait": load},
        "models": LABELS,
        "config": {
            "source": source,
            OURS: {**config.to_diff_dict(), "params": ours_parts},
            LLAVA: {**llava_cfg.to_diff_dict(), "params": llava_parts, "match": match},
            "args": vars(args),
        },
        "notes": [
            "seconds = median wall time of one pipeline call (image preprocessing, tokenisation, greedy "
            "generate with min_new_tokens = max_new_tokens, decoding), ours and LLaVA alternating after "
            f"{args.warmup} warm-up call(s); ratio_vs_llava = LLaVA seconds / ours (above 1: ours faster).",
            "Both processors give identical input ids (checked per case): same tokenizer, same chat "
            "template, same image-token expansion; both models generate exactly the requested tokens.",
            "Random weights: the generated text is meaningless; only the cost is measured.",
            "The projectors differ (ours: Linear(Dv, 4 Dv), GELU, Linear(4 Dv, Dt); LLaVA: Linear(Dv, Dt), "
            "GELU, Linear(Dt, Dt)); the parameter match is on the vision tower and the text model.",
        ],
    }
    with tempfile.TemporaryDirectory(prefix="bench_vlm_") as tmp:
        folders = {OURS: Path(tmp) / OURS, LLAVA: Path(tmp) / LLAVA}
        for name, model in ((OURS, ours), (LLAVA, llava)):
            model.save_pretrained(folders[name])
            processors[name].save_pretrained(folders[name])
        pipes = {
            name: pipeline("image-text-to-text", model=str(folder), device=device, dtype=dtype)
            for name, folder in folders.items()
        }
        for name, pipe in pipes.items():
            expected = VLMambaForConditionalGeneration if name == OURS else LlavaForConditionalGeneration
            assert isinstance(pipe.model, expected), type(pipe.model)
        models = {name: pipe.model for name, pipe in pipes.items()}
        processors = {name: pipe.processor for name, pipe in pipes.items()}
        results["cases"] = run_cases(args, pipes, models, processors, build_cases(args, processors[OURS]))
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["elapsed_s"] = time.time() - started
    path = write_json(args.out, results)
    print_table(results)
    print(f"\nwrote {path} in {results['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()

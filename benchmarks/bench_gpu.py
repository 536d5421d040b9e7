"""GPU benchmark: VLMamba on CUDA against mamba_ssm, transformers' Mamba, Llama and LLaVA, side by side.

One process per suite, the candidates alternating on the same random inputs after a warm-up (BENCHMARKS.md).

text suite (text-130m, 24 layers, hidden 768, vocab 50280):
    ours              VLMambaForCausalLM, generate() on transformers' DynamicCache, eager, mamba_ssm kernels
    ours_cuda_graphs  the same model, generate(cache_implementation="static"): fixed-shape state, decode
                      step compiled by transformers (CompileConfig mode "reduce-overhead" = CUDA graphs)
    mamba_ssm         mamba_ssm MambaLMHeadModel (random weights, same shape), generate(cg=False)
    mamba_ssm_cg      the same model, generate(cg=True) (its own CUDA-graph decoding)
    mamba_hf          transformers MambaForCausalLM with ours' weights, its kernel path
    llama             transformers LlamaForCausalLM (SDPA), parameter-matched (tied embeddings)
  cases: memory bandwidth (device-to-device copy), decode (batch 1 and 8 at 1k/8k/32k context, through
  generate: (time of N new tokens - time of 1) / (N - 1)), prefill (batch 1, 1k/4k/16k), training step
  (fwd + bwd, L = 1024), peak memory (fresh subprocess per cell: prefill 16k, decode at 32k, training).

vlm suite (vision-tiny Vim tower, 224 px, + text-130m; LLaVA with a SigLIP tower and a Llama, each within
10% of ours): prefill of one image + 1k text tokens, decode at batch 1 and 8, ours / ours_cuda_graphs / llava.

    python -m benchmarks.bench_gpu --suite text --budget-min 4      # -> results/text_<gpu>.json
    python -m benchmarks.bench_gpu --suite vlm --budget-min 1.5     # -> results/vlm_gen_<gpu>.json
    python -m benchmarks.bench_gpu --plan                           # the plan; needs no GPU
    python -m benchmarks.bench_gpu --smoke --out /tmp/smoke         # tiny models on CPU: checks the script

Cells left when the time budget runs out are skipped and listed (with the reason) in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: nothing may download

import torch
from transformers import (
    CompileConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    MambaConfig,
    MambaForCausalLM,
)
from transformers.utils import logging as hf_logging

from benchmarks.bench_text import (
    VOCAB,
    build_mamba_pair,
    llama_config,
    mamba_config,
    matched_llama_config,
    meta_param_count,
)
from benchmarks.common import (
    DTYPES,
    card_slug,
    compare,
    emit_memory_result,
    format_table,
    machine_info,
    memory_baseline,
    memory_peak,
    param_count,
    random_token_ids,
    ratio,
    run_memory_case,
    time_once,
    write_json,
)
from vlm_mamba_hf import (
    VLMambaConfig,
    VLMambaForCausalLM,
    VLMambaForConditionalGeneration,
    VLMambaVisionConfig,
)
from vlm_mamba_hf.ssm_ops import kernels_available

MODULE = "benchmarks.bench_gpu"
OURS, OURS_CG, MAMBA_SSM, MAMBA_SSM_CG, MAMBA_HF, LLAMA, LLAVA = (
    "ours",
    "ours_cuda_graphs",
    "mamba_ssm",
    "mamba_ssm_cg",
    "mamba_hf",
    "llama",
    "llava",
)
LABELS = {
    OURS: "VLMambaForCausalLM / VLMambaForConditionalGeneration, generate() eager (DynamicCache), kernels",
    OURS_CG: "the same model, generate(cache_implementation='static'): compiled decode step, CUDA graphs",
    MAMBA_SSM: "mamba_ssm MambaLMHeadModel, generate(cg=False)",
    MAMBA_SSM_CG: "mamba_ssm MambaLMHeadModel, generate(cg=True)",
    MAMBA_HF: "transformers MambaForCausalLM (kernel path), ours' weights",
    LLAMA: "transformers LlamaForCausalLM (SDPA), parameter-matched, tied embeddings",
    LLAVA: "transformers LlavaForConditionalGeneration (SigLIP + Llama, SDPA), parameter-matched",
}
TEXT_MODELS = (OURS, OURS_CG, MAMBA_SSM, MAMBA_SSM_CG, MAMBA_HF, LLAMA)
VLM_MODELS = (OURS, OURS_CG, LLAVA)
# The CUDA-graph candidates decode faster and get --new-tokens (the eager ones --slow-new-tokens); they share
# their model with `ours` / `mamba_ssm`, so prefill, training and memory measure each model once.
FAST_DECODERS = (OURS_CG, MAMBA_SSM_CG)
# Shape-specialised graphs (one per batch size) rather than a dynamic-shape recompile on the second size.
COMPILE_CONFIG = CompileConfig(dynamic=False, mode="reduce-overhead")
# --smoke: transformers' compiled decoding on CPU too, traced by dynamo but run eagerly (no code generation).
SMOKE_COMPILE_CONFIG = CompileConfig(dynamic=False, backend="eager", mode=None)
SMOKE_COMPILE_CONFIG._compile_all_devices = True
LONGEST_CONTEXT = 65536  # Llama's max_position_embeddings here (RoPE; the default 2048 is too short)
IMAGE_TOKEN_ID = VOCAB - 1
SMOKE = {"on": False}  # --smoke: tiny configs on CPU, to check the script's plumbing without a GPU


def text_config():
    """text-130m, or a 2-layer hidden-64 model of the same vocabulary under --smoke."""
    return mamba_config(hidden_size=64, num_hidden_layers=2) if SMOKE["on"] else mamba_config()


# ----------------------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------------------


def measure_bandwidth(device: str, n_bytes: int = 2**30, repeats: int = 10) -> dict[str, Any]:
    """Memory bandwidth from a device-to-device copy: 2 * bytes (read + write) / median time."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        seconds = time_once(lambda: dst.copy_(src), device)
        if i >= 2:
            times.append(seconds)
    median = sorted(times)[len(times) // 2]
    return {"bytes_per_s": 2 * n_bytes / median, "copy_bytes": n_bytes, "median_s": median, "times_s": times}


def mamba_ssm_status() -> dict[str, Any]:
    """Whether mamba_ssm's LM and generation import; the reason when not (its candidates are then skipped)."""
    try:
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
        from mamba_ssm.utils.generation import InferenceParams  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return {"available": False, "reason": f"mamba_ssm does not import: {type(err).__name__}: {err}"}
    import mamba_ssm

    return {"available": True, "version": getattr(mamba_ssm, "__version__", "?")}


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def build_mamba_ssm(device: str, dtype: torch.dtype):
    """mamba_ssm's MambaLMHeadModel of the text-130m shape (random weights; A_log and D fp32 as it builds them)."""
    from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    config = text_config()
    ssm_config = SSMConfig(
        d_model=config.hidden_size,
        n_layer=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        ssm_cfg={"layer": "Mamba1", "d_state": config.state_size, "d_conv": config.conv_kernel},
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=8,
    )
    torch.manual_seed(0)
    return MambaLMHeadModel(ssm_config, device=device, dtype=dtype).eval()


def text_llama_config() -> tuple[Any, dict[str, Any]]:
    """The parameter-matched Llama of text-130m (one layer under --smoke), with room for the longest context."""
    if SMOKE["on"]:
        config, record = llama_config(num_hidden_layers=1), {"smoke": "not parameter-matched"}
    else:
        config, record = matched_llama_config(meta_param_count(VLMambaForCausalLM, mamba_config()), 12)
    config.max_position_embeddings = LONGEST_CONTEXT
    return config, record


def build_text_model(name: str, device: str, dtype: torch.dtype):
    """One text candidate's model alone (the memory cells build only the model they measure)."""
    torch.manual_seed(0)
    if name in (MAMBA_SSM, MAMBA_SSM_CG):
        return build_mamba_ssm(device, dtype)
    if name == LLAMA:
        model = LlamaForCausalLM(text_llama_config()[0])
    else:
        model = (MambaForCausalLM if name == MAMBA_HF else VLMambaForCausalLM)(text_config())
    return model.to(device=device, dtype=dtype).eval()


def build_text_models(device: str, dtype: torch.dtype, ssm: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Every text candidate by name (ours and ours_cuda_graphs share one model, as do the mamba_ssm pair)."""
    config = text_config()
    ours, mamba_hf = build_mamba_pair(config, device, dtype)
    llama_cfg, llama_record = text_llama_config()
    llama = build_text_model(LLAMA, device, dtype)
    models: dict[str, Any] = {OURS: ours, OURS_CG: ours, MAMBA_HF: mamba_hf, LLAMA: llama}
    if ssm["available"]:
        models[MAMBA_SSM] = models[MAMBA_SSM_CG] = build_mamba_ssm(device, dtype)
    records = {
        "text-130m": {**config.to_diff_dict(), "params": param_count(ours)},
        "llama": {**llama_cfg.to_diff_dict(), **llama_record},
    }
    if MAMBA_SSM in models:
        records["mamba_ssm"] = {
            "params": param_count(models[MAMBA_SSM]),
            "note": "vocab padded to a multiple of 8",
        }
    return models, records


def vlm_config() -> VLMambaConfig:
    """vision-tiny (Vim-tiny shape: hidden 192, 24 bidirectional layers, patch 16, 224 px) + text-130m."""
    if SMOKE["on"]:
        vision = VLMambaVisionConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2)
        text = mamba_config(hidden_size=128, num_hidden_layers=2)
    else:
        vision = VLMambaVisionConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=24)
        text = mamba_config()
    return VLMambaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)


def build_vlm_models(device: str, dtype: torch.dtype) -> tuple[dict[str, Any], dict]:
    """Ours (eager and CUDA-graph decoding share it) and a LLaVA whose vision tower and Llama match ours."""
    from benchmarks.bench_vlm import matched_llava_config, part_params

    config = vlm_config()
    torch.manual_seed(0)
    ours = VLMambaForConditionalGeneration(config)
    parts = part_params(ours)
    llava_cfg, match = matched_llava_config(config, parts)
    llava_cfg.text_config.max_position_embeddings = LONGEST_CONTEXT
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(llava_cfg)
    ours = ours.to(device=device, dtype=dtype).eval()
    llava = llava.to(device=device, dtype=dtype).eval()
    records = {
        OURS: {**config.to_diff_dict(), "params": parts},
        LLAVA: {**llava_cfg.to_diff_dict(), "params": part_params(llava), "match": match},
    }
    return {OURS: ours, OURS_CG: ours, LLAVA: llava}, records


# ----------------------------------------------------------------------------------------------------------
# What is timed
# ----------------------------------------------------------------------------------------------------------


def generate_call(name: str, model, inputs: dict[str, torch.Tensor], new_tokens: int) -> Callable[[], Any]:
    """One greedy generate of exactly `new_tokens` tokens, as each candidate's users would call it."""
    ids = inputs["input_ids"]
    if name in (MAMBA_SSM, MAMBA_SSM_CG):
        cg = name == MAMBA_SSM_CG
        return lambda: model.generate(input_ids=ids, max_length=ids.shape[1] + new_tokens, cg=cg, top_k=1)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    if name == OURS_CG:
        config = SMOKE_COMPILE_CONFIG if SMOKE["on"] else COMPILE_CONFIG
        kwargs.update(cache_implementation="static", compile_config=config)
    mask = torch.ones_like(ids)
    return lambda: model.generate(**inputs, attention_mask=mask, **kwargs)


def prefill_call(name: str, model, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """The prefill as generate() runs it: fill the state / cache, logits for the last position only."""
    if name in (MAMBA_SSM, MAMBA_SSM_CG):
        from mamba_ssm.utils.generation import InferenceParams

        ids = inputs["input_ids"]

        def run():
            params = InferenceParams(max_seqlen=ids.shape[1] + 1, max_batch_size=ids.shape[0])
            return model(ids, inference_params=params, num_last_tokens=1)

        return run
    return lambda: model(**inputs, use_cache=True, logits_to_keep=1)


def train_call(name: str, model, ids: torch.Tensor) -> Callable[[], Any]:
    """Forward + backward of the causal-LM loss on the input itself (no optimizer step)."""

    def step():
        model.zero_grad(set_to_none=True)
        if name in (MAMBA_SSM, MAMBA_SSM_CG):
            logits = model(ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()

    return step


def state_bytes(batch: int, layers: int, d_inner: int, conv_kernel: int, state: int, act_bytes: int) -> int:
    """Bytes a Mamba decode step reads and writes in its state: conv window (activations), SSM state (fp32)."""
    return 2 * batch * layers * d_inner * (conv_kernel * act_bytes + state * 4)


def decode_step_bytes(name: str, model, batch: int, context: int, mamba: MambaConfig) -> int:
    """Bytes one decode step must move at least: every weight of the language model once (tied counted
    once; a VLM's vision tower and projector are not run after the prefill) plus the state or the KV cache
    it reads (the KV cache of Llama grows with the context; a Mamba state, shaped by `mamba`, does not)."""
    inner = getattr(model, "model", None)
    idle = {
        id(p)
        for part in ("vision_tower", "multi_modal_projector")
        if inner is not None and hasattr(inner, part)
        for p in getattr(inner, part).parameters()
    }
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in idle)
    act = next(model.parameters()).element_size()
    config = getattr(model, "config", None)
    if name in (LLAMA, LLAVA):
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv = 2 * text.num_hidden_layers * batch * context * text.num_key_value_heads * head_dim * act
        return weights + kv
    return weights + state_bytes(
        batch, mamba.num_hidden_layers, mamba.intermediate_size, mamba.conv_kernel, mamba.state_size, act
    )


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget for a suite; cells that would start after it are skipped with the reason."""

    def __init__(self, minutes: float):
        self.deadline = time.time() + 60 * minutes
        self.skipped: list[str] = []

    def allows(self, what: str) -> bool:
        if time.time() < self.deadline:
            return True
        self.skipped.append(f"{what}: skipped, time budget spent")
        print(f"  {what}: skipped (time budget spent)", flush=True)
        return False


def text_inputs(batch: int, length: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": random_token_ids(batch, length, VOCAB, generator, device)}


def vlm_inputs(
    config: VLMambaConfig, batch: int, text_length: int, dtype: torch.dtype, seed: int, device: str
):
    """One image per row (its image tokens first) and `text_length` random text tokens (never the image token)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.full((batch, config.num_image_tokens), config.image_token_id)
    text = torch.randint(1, config.image_token_id, (batch, text_length), generator=generator)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(dtype)
    return {"input_ids": torch.cat([image, text], dim=1).to(device), "pixel_values": pixels.to(device)}


def run_decode_cell(
    models: dict[str, Any],
    inputs: dict[str, torch.Tensor],
    context: int,
    args,
    bandwidth: float,
    mamba: MambaConfig,
) -> dict[str, Any]:
    """Per candidate: first call (compile / graph capture included), then generate(N) and generate(1)
    alternating; ms per token = (median(N) - median(1)) / (N - 1)."""
    batch = inputs["input_ids"].shape[0]
    new = {name: args.new_tokens if name in FAST_DECODERS else args.slow_new_tokens for name in models}
    candidates: dict[str, Callable[[], Any]] = {}
    first_call_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    with torch.inference_mode():
        for name, model in list(models.items()):
            try:
                call = generate_call(name, model, inputs, new[name])
                first_call_s[name] = time_once(call, args.device)
            except Exception as err:  # one candidate failing (a compile error, say) keeps the others
                errors[name] = f"{type(err).__name__}: {err}"[:1500]
                print(f"  decode: {name} failed: {errors[name][:400]}", flush=True)
                continue
            candidates[f"{name}|1"] = generate_call(name, model, inputs, 1)
            candidates[f"{name}|{new[name]}"] = call
        models = {name: m for name, m in models.items() if name not in errors}
        warmup = {key: int(key.endswith("|1")) for key in candidates}  # the N calls just ran once
        timings = compare(candidates, args.device, repeats=args.repeats, warmup=warmup)
    record: dict[str, Any] = {
        "batch": batch,
        "context": context,
        "new_tokens": new,
        "first_call_s": first_call_s,
        "timings": timings,
    }
    ms, tokens_per_s, fraction, whole_call = {}, {}, {}, []
    for name, model in models.items():
        long_s = timings[f"{name}|{new[name]}"]["median_s"]
        step = (long_s - timings[f"{name}|1"]["median_s"]) / (new[name] - 1)
        if step <= 0:
            # Noise larger than the decode time (tiny models on a busy CPU): the whole call's time per token,
            # an upper bound, instead of a meaningless difference.
            step = long_s / new[name]
            whole_call.append(name)
        ms[name] = 1000 * step
        tokens_per_s[name] = batch / step
        bound = decode_step_bytes(name, model, batch, context, mamba) / bandwidth
        fraction[name] = bound / step
    if whole_call:
        record["per_token_from_whole_call"] = whole_call
    if errors:
        record["errors"] = errors
    record.update(
        ms_per_token=ms,
        tokens_per_s=tokens_per_s,
        fraction_of_bandwidth_bound=fraction,
        ratios_vs={
            b: ratio(tokens_per_s[OURS_CG], tokens_per_s[b])
            for b in models
            if tokens_per_s.get(b) and tokens_per_s.get(OURS_CG)
        },
    )
    print(
        f"  decode b={batch} ctx={context}: "
        + ", ".join(f"{n} {v:.0f} tok/s" for n, v in tokens_per_s.items() if v)
        + f"  (first call: {', '.join(f'{n} {s:.1f}s' for n, s in first_call_s.items())})",
        flush=True,
    )
    return record


def distinct_models(models: dict[str, Any]) -> dict[str, Any]:
    """The candidates with a model of their own (the CUDA-graph decoders share theirs)."""
    return {name: m for name, m in models.items() if name not in FAST_DECODERS}


def throughput_record(kind: str, size_key: str, tokens: int, timings: dict[str, Any]) -> dict[str, Any]:
    """tokens/s per candidate from `compare` timings, printed, with the ratios of ours against each."""
    tps = {name: tokens / t["median_s"] for name, t in timings.items()}
    print(f"  {kind} L={tokens}: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in tps.items()), flush=True)
    return {
        size_key: tokens,
        "tokens_per_s": tps,
        "ratios_vs": {b: ratio(tps[OURS], v) for b, v in tps.items()},
        "timings": timings,
    }


def run_prefill_cell(models: dict[str, Any], inputs: dict[str, torch.Tensor], args) -> dict[str, Any]:
    """Prefill tokens/s per candidate (one per distinct model: ours_cuda_graphs prefills as ours does)."""
    candidates = {name: prefill_call(name, m, inputs) for name, m in distinct_models(models).items()}
    with torch.inference_mode():
        timings = compare(candidates, args.device, repeats=args.repeats, warmup=1)
    return throughput_record("prefill", "tokens", inputs["input_ids"].numel(), timings)


def run_train_cell(models: dict[str, Any], length: int, args) -> dict[str, Any]:
    """Training-step tokens/s (fwd + bwd of the LM loss, batch 1); ours trains on the fused mamba_inner_fn."""
    distinct = distinct_models(models)
    ids = text_inputs(1, length, seed=5, device=args.device)["input_ids"]
    for model in distinct.values():
        model.train()
    try:
        candidates = {name: train_call(name, m, ids) for name, m in distinct.items()}
        timings = compare(candidates, args.device, repeats=args.repeats, warmup=1)
    finally:
        for model in distinct.values():
            model.zero_grad(set_to_none=True)
            model.eval()
    return throughput_record("train", "length", length, timings)


def run_memory_cells(specs: list[dict[str, Any]], args, budget: Budget) -> dict[str, Any]:
    """Peak memory per cell, each in a fresh `python -m benchmarks.bench_gpu --_memory-case` process."""
    out: dict[str, Any] = {}
    for spec in specs:
        label = f"memory {spec['case']} {spec['model']}"
        if not budget.allows(label):
            continue
        try:
            flags = ["--dtype", args.dtype, *(["--smoke"] if SMOKE["on"] else [])]
            result = run_memory_case(MODULE, [*flags, "--_memory-case", json.dumps(spec)], 600)
        except RuntimeError as err:
            result = {"error": str(err)[-1500:]}
        out.setdefault(spec["cell"], {})[spec["model"]] = result
        peak = result.get("peak_bytes")
        print(f"  {label}: {peak / 2**30:.2f} GiB peak" if peak else f"  {label}: failed", flush=True)
    return out


def memory_child(spec: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Runs in the subprocess: build one model, take the baseline, run the cell, report the peak."""
    name, suite, device = spec["model"], spec["suite"], spec["device"]
    if suite == "text":
        model = build_text_model(name, device, dtype)
    else:
        models, _ = build_vlm_models(device, dtype)
        model = models.pop(name)
        del models  # the other model's weights are freed before the baseline
    inputs = (
        text_inputs(spec["batch"], spec["length"], seed=6, device=device)
        if suite == "text"
        else vlm_inputs(vlm_config(), spec["batch"], spec["length"], dtype, seed=6, device=device)
    )
    baseline = memory_baseline(device)
    if spec["case"] == "prefill":
        with torch.inference_mode():
            prefill_call(name, model, inputs)()
    elif spec["case"] == "decode":
        with torch.inference_mode():
            generate_call(name, model, inputs, spec["new_tokens"])()
    else:
        model.train()
        train_call(name, model, inputs["input_ids"])()
    peak = memory_peak(baseline)
    return {**peak, **spec, "peak_gib": peak["peak_bytes"] / 2**30}


# ----------------------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------------------


def _no_flush(_out: dict[str, Any]) -> None:
    pass


def run_text_suite(
    args, budget: Budget, bandwidth: float, notes: list[str], flush: Callable[[dict], None] = _no_flush
) -> dict[str, Any]:
    ssm = mamba_ssm_status()
    if not ssm["available"]:
        notes.append(f"mamba_ssm and mamba_ssm_cg skipped: {ssm['reason']}")
    models, records = build_text_models(args.device, DTYPES[args.dtype], ssm)
    out: dict[str, Any] = {"config": records, "mamba_ssm": ssm, "decode": {}, "prefill": {}, "train": {}}
    out["memory"] = {}
    names = [n for n in (OURS, MAMBA_SSM, MAMBA_HF, LLAMA) if n != MAMBA_SSM or ssm["available"]]

    def memory_spec(case: str, model: str, length: int, **extra) -> dict[str, Any]:
        return {
            "suite": "text",
            "device": args.device,
            "cell": f"{case}_{length}",
            "case": case,
            "model": model,
            "batch": 1,
            "length": length,
            **extra,
        }

    longest_prefill, longest_context = max(args.prefill_lengths), max(args.contexts)
    target_memory = [memory_spec("prefill", n, longest_prefill) for n in names]
    target_memory += [memory_spec("decode", n, longest_context, new_tokens=8) for n in (OURS, LLAMA)]
    other_memory = [memory_spec("train", n, args.train_length) for n in names]
    # Most telling cells first, the targets' cells before the rest: whatever the budget cuts is at the end.
    # Peak memory runs in fresh processes, so the models held here do not count towards it.
    cells: list[tuple[str, Any, int]] = [("decode", 1, args.contexts[0])]
    cells += [("prefill", 1, length) for length in args.prefill_lengths]
    cells += [("train", 1, args.train_length)]
    cells += [("decode", 1, c) for c in args.contexts[1:]]
    cells += [("memory", target_memory, 0)]
    cells += [("decode", b, c) for b in args.batches if b != 1 for c in args.contexts]
    cells += [("memory", other_memory, 0)]
    for kind, batch, length in cells:
        if kind == "memory":
            for cell, by_model in run_memory_cells(batch, args, budget).items():
                out["memory"].setdefault(cell, {}).update(by_model)
            flush(out)
            continue
        key = f"b{batch}_L{length}" if kind != "train" else f"L{length}"
        if not budget.allows(f"{kind} {key}"):
            continue
        try:
            if kind == "decode":
                inputs = text_inputs(batch, length, seed=batch * 7 + length, device=args.device)
                out["decode"][key] = run_decode_cell(models, inputs, length, args, bandwidth, text_config())
            elif kind == "prefill":
                inputs = text_inputs(1, length, seed=length, device=args.device)
                out["prefill"][key] = run_prefill_cell(models, inputs, args)
            else:
                out["train"][key] = run_train_cell(models, length, args)
        except torch.OutOfMemoryError as err:
            out[kind][key] = {"error": f"out of memory: {err}"[:500]}
            torch.cuda.empty_cache()
        except Exception as err:  # one broken candidate must not cost the cells after it
            out[kind][key] = {"error": f"{type(err).__name__}: {err}"[:1500]}
            print(f"  {kind} {key}: failed: {type(err).__name__}: {err}"[:600], flush=True)
        out["targets"] = text_targets(out)
        flush(out)
    del models
    torch.cuda.empty_cache()
    out["targets"] = text_targets(out)
    return out


def run_vlm_suite(
    args, budget: Budget, bandwidth: float, notes: list[str], flush: Callable[[dict], None] = _no_flush
) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    models, records = build_vlm_models(args.device, dtype)
    config = models[OURS].config
    out: dict[str, Any] = {"config": records, "decode": {}, "prefill": {}}
    text_length = args.vlm_text_tokens
    context = config.num_image_tokens + text_length
    if budget.allows("vlm prefill"):
        inputs = vlm_inputs(config, 1, text_length, dtype, seed=11, device=args.device)
        out["prefill"][f"b1_L{context}"] = run_prefill_cell(models, inputs, args)
        flush(out)
    for batch in args.batches:
        if budget.allows(f"vlm decode b{batch}"):
            inputs = vlm_inputs(config, batch, 64, dtype, seed=12 + batch, device=args.device)
            out["decode"][f"b{batch}"] = run_decode_cell(
                models, inputs, config.num_image_tokens + 64, args, bandwidth, config.text_config
            )
            flush(out)
    del models
    torch.cuda.empty_cache()
    specs = [
        {
            "suite": "vlm",
            "device": args.device,
            "cell": f"prefill_{context}",
            "case": "prefill",
            "model": n,
            "batch": 1,
            "length": text_length,
        }
        for n in (OURS, LLAVA)
    ]
    out["memory"] = run_memory_cells(specs, args, budget)
    return out


def text_targets(out: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from whatever cells ran (None where a cell is missing)."""

    def get(*keys):
        node: Any = out
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    decode_1k = min(
        (k for k in out["decode"] if k.startswith("b1_")), default=None, key=lambda k: int(k.split("L")[1])
    )
    decode_long = max(
        (k for k in out["decode"] if k.startswith("b1_")), default=None, key=lambda k: int(k.split("L")[1])
    )
    prefill_long = max(out["prefill"], default=None, key=lambda k: int(k.split("L")[1]))
    train = next(iter(out["train"]), None)
    memory_prefill = next((k for k in out.get("memory", {}) if k.startswith("prefill")), None)
    memory_decode = next((k for k in out.get("memory", {}) if k.startswith("decode")), None)

    def mem_ratio(cell):
        a, b = get("memory", cell, OURS, "peak_bytes"), get("memory", cell, LLAMA, "peak_bytes")
        return ratio(a, b) if a and b else None

    return {
        "decode_b1_vs_mamba_ssm_cg (>= 1.0)": get("decode", decode_1k, "ratios_vs", MAMBA_SSM_CG),
        "decode_b1_vs_mamba_hf (>= 5)": get("decode", decode_1k, "ratios_vs", MAMBA_HF),
        "prefill_longest_vs_mamba_ssm (>= 0.9)": get("prefill", prefill_long, "ratios_vs", MAMBA_SSM),
        "prefill_longest_peak_memory_vs_llama (<= 0.6)": mem_ratio(memory_prefill),
        "train_vs_mamba_ssm (>= 0.9)": get("train", train, "ratios_vs", MAMBA_SSM),
        "decode_longest_context_vs_llama (>= 3)": get("decode", decode_long, "ratios_vs", LLAMA),
        "decode_longest_context_peak_memory_vs_llama (<= 0.4)": mem_ratio(memory_decode),
        "decode_b1_fraction_of_bandwidth_bound_ours_cuda_graphs": get(
            "decode", decode_1k, "fraction_of_bandwidth_bound", OURS_CG
        ),
        "cells": {"decode": decode_1k, "decode_long": decode_long, "prefill": prefill_long, "train": train},
    }


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def print_tables(results: dict[str, Any]) -> None:
    """The short summary printed last: tokens/s per cell and candidate, peak memory, the issue's targets."""
    print(f"{results['machine'].get('gpu') or results['machine']['cpu']}, {results['machine']['dtype']}")
    for suite, out in results["suites"].items():
        names = list(TEXT_MODELS if suite == "text" else VLM_MODELS)
        distinct = [n for n in names if n not in FAST_DECODERS]  # prefill, train, memory
        decode_rows = [
            [key, *(r["tokens_per_s"].get(n) for n in names), r["fraction_of_bandwidth_bound"].get(OURS_CG)]
            for key, r in out.get("decode", {}).items()
            if "tokens_per_s" in r
        ]
        if decode_rows:
            print(
                f"\n[{suite}] decode via generate, tokens/s (bw: ours_cuda_graphs' fraction of the bandwidth bound)"
            )
            print(format_table(["cell", *names, "bw"], decode_rows))
        for kind in ("prefill", "train"):
            rows = [
                [key, *(r["tokens_per_s"].get(n) for n in distinct)]
                for key, r in out.get(kind, {}).items()
                if "tokens_per_s" in r
            ]
            if rows:
                print(f"\n[{suite}] {kind}, tokens/s")
                print(format_table(["cell", *distinct], rows))
        rows = [
            [cell, *(by_model.get(n, {}).get("peak_gib") for n in distinct)]
            for cell, by_model in out.get("memory", {}).items()
        ]
        if rows:
            print(f"\n[{suite}] peak memory, GiB (fresh process per cell)")
            print(format_table(["cell", *distinct], rows))
        if out.get("targets"):
            print(f"\n[{suite}] targets (issue 6)")
            rows = [[k, v] for k, v in out["targets"].items() if k != "cells"]
            print(format_table(["target", "value"], rows))
    if results.get("skipped"):
        print("\nskipped: " + "; ".join(results["skipped"]))
    if results.get("bandwidth"):
        print(f"bandwidth (device copy): {results['bandwidth']['bytes_per_s'] / 1e9:.0f} GB/s")


def plan(args) -> dict[str, Any]:
    """What a run would do (printed by --plan; needs no GPU)."""
    return {
        "suites": args.suites,
        "models": {"text": list(TEXT_MODELS), "vlm": list(VLM_MODELS)},
        "decode": {
            "batches": args.batches,
            "contexts": args.contexts,
            "new_tokens": args.new_tokens,
            "slow_new_tokens": args.slow_new_tokens,
        },
        "prefill_lengths": args.prefill_lengths,
        "train_length": args.train_length,
        "vlm_text_tokens": args.vlm_text_tokens,
        "repeats": args.repeats,
        "budget_min": args.budget_min,
        "mamba_ssm": mamba_ssm_status(),
        "kernels": kernels_available(),
        "compile_config": COMPILE_CONFIG.to_dict(),
    }


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="text,vlm", help="comma-separated: text, vlm")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="short contexts, few tokens: a smoke run")
    parser.add_argument("--contexts", type=_int_list, help="decode contexts (default 1024,8192,32768)")
    parser.add_argument("--batches", type=_int_list, help="decode batch sizes (default 1,8)")
    parser.add_argument("--prefill-lengths", type=_int_list, help="default 1024,4096,16384")
    parser.add_argument("--train-length", type=int, help="training-step length (default 1024)")
    parser.add_argument("--new-tokens", type=int, help="new tokens for CUDA-graph decoders (default 128)")
    parser.add_argument("--slow-new-tokens", type=int, help="new tokens for eager decoders (default 32)")
    parser.add_argument(
        "--vlm-text-tokens", type=int, help="text tokens after the image in the VLM prefill (1024)"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per candidate (default 2)")
    parser.add_argument("--budget-min", type=float, default=6.0, help="wall-clock budget for all suites")
    parser.add_argument("--out", help="results name prefix (default <suite>_<gpu>, vlm: vlm_gen_<gpu>)")
    parser.add_argument("--out-dir", help="folder for the default-named results (default benchmarks/results)")
    parser.add_argument(
        "--summary", nargs="+", metavar="JSON", help="print the tables of saved results and exit"
    )
    parser.add_argument("--plan", action="store_true", help="print the plan as JSON and exit (no GPU needed)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models and sizes on CPU: checks the script, measures nothing",
    )
    parser.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.suites = [s for s in args.suite.split(",") if s]
    unknown = set(args.suites) - {"text", "vlm"}
    if unknown:
        parser.error(f"unknown suite(s) {sorted(unknown)}; choose from text, vlm")
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.contexts, args.batches, args.prefill_lengths = [16, 32], [1, 2], [16, 32]
        args.train_length, args.new_tokens, args.slow_new_tokens = 16, 4, 3
        args.vlm_text_tokens, args.repeats = 8, 1
    args.contexts = args.contexts or ([256, 1024] if quick else [1024, 8192, 32768])
    args.batches = args.batches or [1, 8]
    args.prefill_lengths = args.prefill_lengths or ([256, 1024] if quick else [1024, 4096, 16384])
    args.train_length = args.train_length or (256 if quick else 1024)
    args.new_tokens = args.new_tokens or (16 if quick else 128)
    args.slow_new_tokens = args.slow_new_tokens or (8 if quick else 32)
    args.vlm_text_tokens = args.vlm_text_tokens or (128 if quick else 1024)
    args.repeats = args.repeats or (1 if quick else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plan:
        print(json.dumps(plan(args), indent=2))
        return
    if args.summary:
        for path in args.summary:
            print(f"\n== {path}")
            print_tables(json.loads(Path(path).read_text()))
        return
    SMOKE["on"] = args.smoke
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu needs a CUDA device (--plan shows what it would run, --smoke runs it tiny on CPU)."
        )
    hf_logging.set_verbosity_error()
    dtype = DTYPES[args.dtype]
    if args.memory_case:
        emit_memory_result(memory_child(json.loads(args.memory_case), dtype))
        return
    started = time.time()
    budget = Budget(args.budget_min)
    card = "cpu_smoke" if args.smoke else torch.cuda.get_device_name(0)
    bandwidth = measure_bandwidth(args.device, n_bytes=2**26 if args.smoke else 2**30)
    print(
        f"{card}: device copy {bandwidth['bytes_per_s'] / 1e9:.0f} GB/s; kernels {kernels_available()}",
        flush=True,
    )
    for suite in args.suites:
        notes = [
            "decode: per candidate, generate(N new tokens) and generate(1) alternate after a warm-up; ms/token = "
            "(median N - median 1) / (N - 1), so the prefill cancels; tokens/s = batch / that. first_call_s holds "
            "the first call, compile or graph capture included.",
            "fraction_of_bandwidth_bound: (bytes one step must read: every weight once, plus the Mamba state or "
            "Llama's KV cache) / measured device-copy bandwidth, divided by the measured step time.",
            "mamba_ssm has random weights of the same shape (its vocab padded to a multiple of 8); ours and "
            "mamba_hf share weights.",
        ]
        results: dict[str, Any] = {
            "machine": machine_info(args.device, args.dtype),
            "suite": suite,
            "models": LABELS,
            "bandwidth": bandwidth,
            "kernels": kernels_available(),
            "args": {k: v for k, v in vars(args).items() if k != "memory_case"},
            "notes": notes,
        }
        name = (
            f"{args.out}_{suite}"
            if args.out
            else ("text" if suite == "text" else "vlm_gen") + f"_{card_slug(card)}"
        )
        if args.out_dir and not args.out:
            name = os.path.join(args.out_dir, name + ".json")

        def flush(partial: dict[str, Any], results=results, suite=suite, name=name) -> None:
            # Written after every cell, so a run cut short by the lease still leaves what it measured.
            results["suites"] = {suite: partial}
            results["skipped"] = list(budget.skipped)
            results["elapsed_s"] = time.time() - started
            results["complete"] = False
            write_json(name, results)

        runner = run_text_suite if suite == "text" else run_vlm_suite
        results["suites"] = {suite: runner(args, budget, bandwidth["bytes_per_s"], notes, flush)}
        results["skipped"] = list(budget.skipped)
        results["elapsed_s"] = time.time() - started
        results["complete"] = True
        path = write_json(name, results)
        print_tables(results)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()

"""Text-model benchmark: VLMambaForCausalLM against transformers' MambaForCausalLM and a Llama of its size.

Cases (BENCHMARKS.md): prefill tokens/s, decode ms/token against context length, training-step
tokens/s, and peak memory (decode at long context, one training step) in fresh subprocesses. Every
timing runs the candidates side by side in this process on the same random inputs, alternating after a
warm-up, and reports medians and ratios (ours / baseline throughput: above 1 means ours is faster).

    python -m benchmarks.bench_text --quick          # smoke run, about 2 minutes on 2 CPU cores
    python -m benchmarks.bench_text                  # full run -> benchmarks/results/text_cpu.{json,png}
    python -m benchmarks.bench_text --device cuda --dtype bfloat16   # runs bench_gpu's text suite

On a GPU the side-by-side set is another one (mamba_ssm with and without CUDA graphs, our CUDA-graph
decoding, batch 8, the memory-bandwidth bound), so `--device cuda` hands over to `benchmarks.bench_gpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: nothing may download

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM
from transformers.utils import logging as hf_logging

from benchmarks.common import (
    DTYPES,
    compare,
    emit_memory_result,
    format_table,
    machine_info,
    memory_baseline,
    memory_peak,
    param_count,
    plot_panels,
    random_token_ids,
    ratio,
    run_memory_case,
    write_json,
)
from vlm_mamba_hf import VLMambaForCausalLM

MODULE = "benchmarks.bench_text"
OURS, MAMBA_HF, LLAMA, MATMUL = "ours", "mamba_hf", "llama", "matmul_only"
LABELS = {
    OURS: "VLMambaForCausalLM",
    MAMBA_HF: "transformers MambaForCausalLM (PyTorch path on CPU)",
    LLAMA: "transformers LlamaForCausalLM (SDPA), parameter-matched",
    MATMUL: "our Linear layers alone (in_proj, x_proj, dt_proj, out_proj, lm_head)",
}
VOCAB = 50280
PARAM_TOLERANCE = 0.10  # Llama baselines must be within 10% of our parameter count
SLOW_BASELINE_LENGTH = 4096  # from here on transformers' Mamba gets a single repeat (minutes per call)
SLOW_TRAIN_LENGTH = 1024  # from here on transformers' Mamba gets a single training step, no warm-up
MAX_REAL_PREFILL_S = 120.0  # build a decode context by real prefill only if it is estimated to take less


# ----------------------------------------------------------------------------------------------------------
# Configs and models
# ----------------------------------------------------------------------------------------------------------


def mamba_config(hidden_size: int = 768, num_hidden_layers: int = 24) -> MambaConfig:
    """text-130m (state-spaces/mamba-130m-hf shape) by default; `narrow` is hidden 256, 4 layers."""
    return MambaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        vocab_size=VOCAB,
        state_size=16,
        expand=2,
        conv_kernel=4,
    )


def llama_config(num_hidden_layers: int = 12) -> LlamaConfig:
    """The Llama match of text-130m. Embeddings are tied, as Mamba's are; untied, the 12-layer Llama
    would carry a second 38.6M-parameter vocab matrix (162M against 129M) that costs no compute."""
    return LlamaConfig(
        hidden_size=768,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=12,
        intermediate_size=2048,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def meta_param_count(cls: type, config) -> int:
    """Parameter count of `cls(config)` without allocating or initialising any weights."""
    with torch.device("meta"):
        return param_count(cls(config))


def matched_llama_config(target_params: int, num_hidden_layers: int) -> tuple[LlamaConfig, dict[str, Any]]:
    """The Llama config with `num_hidden_layers`, or the layer count nearest `target_params` when that
    one is more than 10% off; the record says which and why."""
    config = llama_config(num_hidden_layers)
    params = meta_param_count(LlamaForCausalLM, config)
    record: dict[str, Any] = {"requested_layers": num_hidden_layers, "layers_adjusted": False}
    if abs(params / target_params - 1) > PARAM_TOLERANCE:
        per_layer = meta_param_count(LlamaForCausalLM, llama_config(num_hidden_layers + 1)) - params
        layers = max(1, round(num_hidden_layers + (target_params - params) / per_layer))
        config = llama_config(layers)
        params = meta_param_count(LlamaForCausalLM, config)
        record["layers_adjusted"] = True
    record.update(
        num_hidden_layers=config.num_hidden_layers,
        params=params,
        params_relative_to_ours=params / target_params - 1,
        tie_word_embeddings=True,
    )
    if abs(params / target_params - 1) > PARAM_TOLERANCE:
        raise AssertionError(f"No Llama within 10% of {target_params} parameters (best: {params}).")
    return config, record


def build_mamba_pair(
    config: MambaConfig, device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[VLMambaForCausalLM, MambaForCausalLM]:
    """Ours with random weights, and transformers' Mamba holding exactly the same weights."""
    torch.manual_seed(seed)
    ours = VLMambaForCausalLM(config)
    reference = MambaForCausalLM(config)
    reference.load_state_dict(ours.state_dict())
    return ours.to(device=device, dtype=dtype).eval(), reference.to(device=device, dtype=dtype).eval()


def build_model(name: str, config: MambaConfig | LlamaConfig, device: str, dtype: torch.dtype, seed: int = 0):
    """One model by name, with random weights (memory subprocesses build only the one they measure)."""
    torch.manual_seed(seed)
    cls = {OURS: VLMambaForCausalLM, MAMBA_HF: MambaForCausalLM, LLAMA: LlamaForCausalLM}[name]
    return cls(config).to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# What is timed
# ----------------------------------------------------------------------------------------------------------


def prefill_fn(model, input_ids: torch.Tensor) -> Callable[[], Any]:
    """One prefill as `generate()` runs it: fill the cache, logits for the last position only."""
    return lambda: model(input_ids, use_cache=True, logits_to_keep=1)


def matmul_only_fn(
    model: VLMambaForCausalLM, length: int, device: str, dtype: torch.dtype
) -> Callable[[], Any]:
    """Our model's own Linear layers alone on `length` tokens: the prefill's matmul bound.

    in_proj, x_proj, dt_proj, out_proj of every layer on (1, length, in_features) inputs, and lm_head
    on the single position whose logits the prefill keeps.
    """
    inputs: dict[int, torch.Tensor] = {}
    jobs = []
    for layer in model.backbone.layers:
        mixer = layer.mixer
        for linear in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj):
            if linear.in_features not in inputs:
                inputs[linear.in_features] = torch.randn(
                    1, length, linear.in_features, device=device, dtype=dtype
                )
            jobs.append((linear, inputs[linear.in_features]))
    jobs.append((model.lm_head, torch.randn(1, 1, model.lm_head.in_features, device=device, dtype=dtype)))
    return lambda: [linear(x) for linear, x in jobs]


def train_step_fn(model, input_ids: torch.Tensor, labels: torch.Tensor) -> Callable[[], Any]:
    """Forward + backward of the causal-LM loss (no optimizer step)."""

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=labels, use_cache=False).loss.backward()

    return step


def decode_step_fn(model, cache, tokens: torch.Tensor) -> Callable[[], Any]:
    """One decoding step per call, feeding the next of `tokens` (b, n) and growing `cache`."""
    position = iter(range(tokens.shape[1]))

    def step():
        i = next(position)
        return model(tokens[:, i : i + 1], cache=cache, use_cache=True)

    return step


def recurrent_cache(
    config: MambaConfig, conv_states: list[torch.Tensor], ssm_states: list[torch.Tensor]
) -> DynamicCache:
    """A fresh Mamba DynamicCache holding the given per-layer states (copied).

    conv_states[i]: (b, d_inner, conv_kernel); ssm_states[i]: (b, d_inner, state_size). Ours and
    transformers' Mamba share this layout, so one prefill can seed both models' decoding.
    """
    cache = DynamicCache(config=config)
    for i, (conv, ssm) in enumerate(zip(conv_states, ssm_states)):
        cache.update_conv_state(conv.clone(), i, conv_kernel_size=config.conv_kernel)
        cache.update_recurrent_state(ssm.clone(), i)
    return cache


def cache_states(cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer (conv_states, ssm_states) of a Mamba DynamicCache."""
    return [layer.conv_states[0] for layer in cache.layers], [
        layer.recurrent_states[0] for layer in cache.layers
    ]


def random_recurrent_states(
    config: MambaConfig, device: str, dtype: torch.dtype, generator: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random per-layer states of the right shapes: what any context length leaves behind (O(1) in it)."""
    d, k, n = config.intermediate_size, config.conv_kernel, config.state_size
    layers = range(config.num_hidden_layers)
    conv = [torch.randn(1, d, k, generator=generator).to(device=device, dtype=dtype) for _ in layers]
    ssm = [torch.randn(1, d, n, generator=generator).to(device=device) for _ in layers]  # fp32, as ours keeps
    return conv, ssm


def random_kv_cache(
    config: LlamaConfig, context: int, device: str, dtype: torch.dtype, generator: torch.Generator
) -> DynamicCache:
    """A Llama DynamicCache holding `context` positions of random keys and values in every layer."""
    cache = DynamicCache(config=config)
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    for i in range(config.num_hidden_layers):
        k, v = (torch.randn(1, heads, context, head_dim, generator=generator) for _ in range(2))
        cache.update(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype), i)
    return cache


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------


def _tokens_per_s(length: int, timings: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {name: length / t["median_s"] for name, t in timings.items()}


def run_prefill(args, models, narrow_models, device, dtype, notes: list[str]) -> dict[str, Any]:
    """Prefill tokens/s (batch 1) for text-130m against both baselines, and for the narrow model."""
    ours, reference, llama = models
    generator = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {"text-130m": {}, "narrow": {}}
    lengths = list(args.lengths) + ([16384] if args.long else [])
    for length in lengths:
        ids = random_token_ids(1, length, VOCAB, generator, device)
        candidates = {OURS: prefill_fn(ours, ids), LLAMA: prefill_fn(llama, ids)}
        repeats = {OURS: args.repeats, LLAMA: args.repeats, MATMUL: args.repeats}
        if length <= SLOW_BASELINE_LENGTH:
            candidates[MAMBA_HF] = prefill_fn(reference, ids)
            repeats[MAMBA_HF] = 1 if length >= SLOW_BASELINE_LENGTH else args.repeats
        if length > SLOW_BASELINE_LENGTH:
            repeats = {name: 1 for name in repeats}
        candidates[MATMUL] = matmul_only_fn(ours, length, device, dtype)
        start = time.time()
        with torch.inference_mode():
            timings = compare(candidates, device, repeats=repeats, warmup=1)
        out["text-130m"][str(length)] = _prefill_record(length, timings)
        print(
            f"  prefill text-130m L={length}: {_summary(out['text-130m'][str(length)])} ({time.time() - start:.0f}s)"
        )
    if any(length >= SLOW_BASELINE_LENGTH for length in lengths):
        notes.append(
            f"prefill: transformers' Mamba (PyTorch path, a Python loop over time) gets 1 timed repeat "
            f"(after 1 warm-up) at L >= {SLOW_BASELINE_LENGTH}; it is not run beyond {SLOW_BASELINE_LENGTH}."
        )
    if any(length > SLOW_BASELINE_LENGTH for length in lengths):
        notes.append(
            f"prefill: L > {SLOW_BASELINE_LENGTH} (e.g. 16384 with --long) is ours vs Llama only, "
            "1 warm-up + 1 timed repeat each."
        )

    narrow_ours, narrow_reference = narrow_models
    for length in args.narrow_lengths:
        ids = random_token_ids(1, length, VOCAB, generator, device)
        candidates = {OURS: prefill_fn(narrow_ours, ids), MAMBA_HF: prefill_fn(narrow_reference, ids)}
        with torch.inference_mode():
            timings = compare(candidates, device, repeats=args.repeats, warmup=1)
        out["narrow"][str(length)] = _prefill_record(length, timings)
        print(f"  prefill narrow L={length}: {_summary(out['narrow'][str(length)])}")
    return out


def _prefill_record(length: int, timings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tps = _tokens_per_s(length, timings)
    record: dict[str, Any] = {
        "tokens_per_s": {n: v for n, v in tps.items() if n != MATMUL},
        "timings": timings,
    }
    for baseline in (MAMBA_HF, LLAMA):
        if baseline in tps:
            record[f"ratio_vs_{baseline}"] = ratio(tps[OURS], tps[baseline])
    if MATMUL in timings:
        record["matmul_only_s"] = timings[MATMUL]["median_s"]
        record["fraction_of_matmul_bound"] = timings[MATMUL]["median_s"] / timings[OURS]["median_s"]
    return record


def _summary(record: dict[str, Any]) -> str:
    parts = [f"{n} {v:.0f} tok/s" for n, v in record["tokens_per_s"].items()]
    if "fraction_of_matmul_bound" in record:
        parts.append(f"matmul-bound fraction {record['fraction_of_matmul_bound']:.2f}")
    return ", ".join(parts)


def run_train(args, config, llama_cfg, llama_record, device, dtype, notes: list[str]) -> dict[str, Any]:
    """Training step (fwd + bwd) tokens/s at L = args.train_length: the 6-layer variant and its Llama match."""
    ours, reference = build_mamba_pair(config, device, dtype)
    llama = build_model(LLAMA, llama_cfg, device, dtype)
    for model in (ours, reference, llama):
        model.train()
    generator = torch.Generator().manual_seed(2)
    ids = random_token_ids(1, args.train_length, VOCAB, generator, device)
    labels = random_token_ids(1, args.train_length, VOCAB, generator, device)
    candidates = {
        name: train_step_fn(m, ids, labels)
        for name, m in ((OURS, ours), (MAMBA_HF, reference), (LLAMA, llama))
    }
    # transformers' Mamba backward on its PyTorch path is quadratic in L (each time step's slice of the
    # (b, d, l, n) tensors back-propagates through a full-size zero tensor): minutes per step at L = 1024.
    slow = args.train_length >= SLOW_TRAIN_LENGTH
    repeats = {OURS: args.repeats, LLAMA: args.repeats, MAMBA_HF: 1 if slow else args.repeats}
    warmup = {OURS: 1, LLAMA: 1, MAMBA_HF: 0 if slow else 1}
    timings = compare(candidates, device, repeats=repeats, warmup=warmup)
    tps = _tokens_per_s(args.train_length, timings)
    notes.append(
        f"train: 6-layer text-130m variant vs a {llama_record['num_hidden_layers']}-layer Llama "
        f"(parameter-matched to it), fwd + bwd of the LM loss on random labels, no optimizer step."
    )
    if slow:
        notes.append(
            f"train: transformers' Mamba gets a single step, no warm-up, at L >= {SLOW_TRAIN_LENGTH} "
            "(its PyTorch-path backward takes minutes)."
        )
    return {
        "length": args.train_length,
        "params": {OURS: param_count(ours), MAMBA_HF: param_count(reference), LLAMA: llama_record["params"]},
        "llama": llama_record,
        "tokens_per_s": tps,
        "timings": timings,
        f"ratio_vs_{MAMBA_HF}": ratio(tps[OURS], tps[MAMBA_HF]),
        f"ratio_vs_{LLAMA}": ratio(tps[OURS], tps[LLAMA]),
    }


def run_decode(args, models, llama_cfg, device, dtype, notes: list[str]) -> dict[str, Any]:
    """Decode ms/token (batch 1) after a context of each length; only decode steps are timed."""
    ours, reference, llama = models
    config = ours.config
    generator = torch.Generator().manual_seed(3)
    out: dict[str, Any] = {}
    prefill_tps = None  # ours, measured on the previous context: predicts the next prefill's time
    for context in args.contexts:
        record: dict[str, Any] = {}
        with torch.inference_mode():
            estimate = context / prefill_tps if prefill_tps else 0.0
            if estimate <= MAX_REAL_PREFILL_S:
                ids = random_token_ids(1, context, VOCAB, generator, device)
                start = time.time()
                cache = ours(ids, use_cache=True, logits_to_keep=1).cache
                seconds = time.time() - start
                prefill_tps = context / seconds
                conv, ssm = cache_states(cache)
                record["state_source"] = f"real prefill by ours ({seconds:.1f}s)"
            else:
                conv, ssm = random_recurrent_states(config, device, dtype, generator)
                record["state_source"] = f"random state (a real prefill was estimated at {estimate:.0f}s)"
                notes.append(
                    f"decode: at context {context} the Mamba state is random (same shapes as after a real "
                    f"prefill; decode cost does not depend on its values), since ours' prefill was estimated "
                    f"at {estimate:.0f}s > {MAX_REAL_PREFILL_S:.0f}s."
                )
            tokens = random_token_ids(1, args.warmup_tokens + args.new_tokens, VOCAB, generator, device)
            candidates = {
                OURS: decode_step_fn(ours, recurrent_cache(config, conv, ssm), tokens),
                MAMBA_HF: decode_step_fn(reference, recurrent_cache(config, conv, ssm), tokens),
                LLAMA: decode_step_fn(
                    llama, random_kv_cache(llama_cfg, context, device, dtype, generator), tokens
                ),
            }
            timings = compare(candidates, device, repeats=args.new_tokens, warmup=args.warmup_tokens)
        ms = {name: 1000 * t["median_s"] for name, t in timings.items()}
        record.update(
            ms_per_token=ms,
            timings=timings,
            **{f"ratio_vs_{b}": ratio(ms[b], ms[OURS]) for b in (MAMBA_HF, LLAMA)},
        )
        out[str(context)] = record
        print(f"  decode context={context}: " + ", ".join(f"{n} {v:.1f} ms/token" for n, v in ms.items()))
        del candidates
    notes.append(
        "decode: ms/token is the median over single decode steps (after warm-up steps), alternating "
        "between models; transformers' Mamba decodes from a copy of ours' state (same cache layout); "
        "Llama's DynamicCache holds random keys/values for the context."
    )
    return out


def run_memory(
    args, decode_layers: dict[str, int], train_layers: dict[str, int], notes: list[str]
) -> dict[str, Any]:
    """Peak memory above the built model, one fresh subprocess per case; *_layers: layer count per model."""
    common = ["--device", args.device, "--dtype", args.dtype]
    cases = {
        f"decode_{args.memory_context}": [
            {
                "case": "decode",
                "model": n,
                "layers": decode_layers[n],
                "context": args.memory_context,
                "steps": 8,
            }
            for n in args.memory_models["decode"]
        ],
        f"train_{args.train_length}": [
            {"case": "train", "model": n, "layers": train_layers[n], "length": args.train_length}
            for n in args.memory_models["train"]
        ],
    }
    out: dict[str, Any] = {}
    for case_name, specs in cases.items():
        out[case_name] = {}
        for spec in specs:
            start = time.time()
            result = run_memory_case(MODULE, [*common, "--_memory-case", json.dumps(spec)])
            out[case_name][spec["model"]] = result
            print(
                f"  memory {case_name} {spec['model']}: {result['peak_above_baseline_mib']:.0f} MiB ({time.time() - start:.0f}s)"
            )
    notes.append(
        f"memory: peak above the freshly built model, each case in its own process. decode_{args.memory_context}: "
        "the context is given as a random Mamba state / random Llama keys and values (no prefill), then 8 "
        "decode steps, so the figure is decoding's own footprint. train: one fwd + bwd step of the 6-layer "
        "variant (Llama parameter-matched)."
    )
    return out


def memory_child(spec: dict[str, Any], device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Runs in the subprocess: build one model, take the baseline, run the case, report the peak."""
    generator = torch.Generator().manual_seed(4)
    name = spec["model"]
    config = llama_config(spec["layers"]) if name == LLAMA else mamba_config(num_hidden_layers=spec["layers"])
    model = build_model(name, config, device, dtype)
    if spec["case"] == "decode":
        baseline = memory_baseline(device)
        with torch.inference_mode():
            if name == LLAMA:
                cache = random_kv_cache(config, spec["context"], device, dtype, generator)
            else:
                cache = recurrent_cache(config, *random_recurrent_states(config, device, dtype, generator))
            tokens = random_token_ids(1, spec["steps"], VOCAB, generator, device)
            step = decode_step_fn(model, cache, tokens)
            for _ in range(spec["steps"]):
                step()
    else:
        model.train()
        ids = random_token_ids(1, spec["length"], VOCAB, generator, device)
        labels = random_token_ids(1, spec["length"], VOCAB, generator, device)
        baseline = memory_baseline(device)
        train_step_fn(model, ids, labels)()
    return {**memory_peak(baseline), **spec, "params": param_count(model)}


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def print_tables(results: dict[str, Any]) -> None:
    """The short human-readable summary printed at the end of a run."""
    if "prefill" in results:
        rows = []
        for model_name, by_length in results["prefill"].items():
            for length, r in by_length.items():
                tps = r["tokens_per_s"]
                rows.append(
                    [
                        model_name,
                        int(length),
                        tps.get(OURS),
                        tps.get(MAMBA_HF),
                        tps.get(LLAMA),
                        r.get(f"ratio_vs_{MAMBA_HF}"),
                        r.get(f"ratio_vs_{LLAMA}"),
                        r.get("fraction_of_matmul_bound"),
                    ]
                )
        print("\nPrefill, batch 1 (tokens/s; ratio = ours / baseline)")
        print(
            format_table(
                ["model", "L", "ours", "mamba_hf", "llama", "x mamba_hf", "x llama", "matmul-bound frac"],
                rows,
            )
        )
    if "decode" in results:
        rows = [
            [
                int(c),
                r["ms_per_token"][OURS],
                r["ms_per_token"][MAMBA_HF],
                r["ms_per_token"][LLAMA],
                r[f"ratio_vs_{MAMBA_HF}"],
                r[f"ratio_vs_{LLAMA}"],
                r["state_source"].split(" (")[0],
            ]
            for c, r in results["decode"].items()
        ]
        print("\nDecode, batch 1 (ms/token; ratio = baseline ms / ours ms)")
        print(format_table(["context", "ours", "mamba_hf", "llama", "x mamba_hf", "x llama", "state"], rows))
    if "train" in results:
        r = results["train"]
        tps = r["tokens_per_s"]
        print(f"\nTraining step, 6-layer variant, L={r['length']} (tokens/s; ratio = ours / baseline)")
        print(
            format_table(
                ["ours", "mamba_hf", "llama", "x mamba_hf", "x llama"],
                [[tps[OURS], tps[MAMBA_HF], tps[LLAMA], r[f"ratio_vs_{MAMBA_HF}"], r[f"ratio_vs_{LLAMA}"]]],
            )
        )
    if "memory" in results:
        rows = [
            [case, *(by_model.get(n, {}).get("peak_above_baseline_mib") for n in (OURS, MAMBA_HF, LLAMA))]
            for case, by_model in results["memory"].items()
        ]
        print("\nPeak memory above the built model (MiB, fresh process per cell)")
        print(format_table(["case", "ours", "mamba_hf", "llama"], rows))


def plot(results: dict[str, Any], path: str) -> None:
    """Two panels: prefill tokens/s against L, decode ms/token against context."""
    prefill_series: dict[str, tuple[list, list]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for model_name, by_length in results.get("prefill", {}).items():
        suffix = "" if model_name == "text-130m" else f" ({model_name})"
        for name in (OURS, MAMBA_HF, LLAMA, MATMUL):
            xs, ys = [], []
            for length, r in by_length.items():
                value = r["tokens_per_s"].get(name)
                if name == MATMUL and "matmul_only_s" in r:
                    value = int(length) / r["matmul_only_s"]
                if value is not None:
                    xs.append(int(length))
                    ys.append(value)
            label = ("matmul bound (ours)" if name == MATMUL else name) + suffix
            if xs:
                prefill_series[label] = (xs, ys)
                styles[label] = {"linestyle": "--" if name == MATMUL else (":" if suffix else "-")}
    decode_series = {
        name: (
            [int(c) for c in results.get("decode", {})],
            [r["ms_per_token"][name] for r in results.get("decode", {}).values()],
        )
        for name in (OURS, MAMBA_HF, LLAMA)
    }
    info = results["machine"]
    plot_panels(
        path,
        [
            {
                "title": "Prefill, batch 1",
                "xlabel": "sequence length L",
                "ylabel": "tokens / s",
                "series": prefill_series,
                "styles": styles,
                "logx": True,
                "logy": True,
            },
            {
                "title": "Decode, batch 1",
                "xlabel": "context length",
                "ylabel": "ms / token",
                "series": decode_series,
                "logx": True,
                "logy": True,
            },
        ],
        title=f"text-130m, {info['device']} {info['dtype']}, {info.get('gpu') or info['cpu']}, "
        f"{info['torch_threads']} threads, torch {info['torch']}, transformers {info['transformers']}, "
        f"load average {info['load_average_at_start'][0]:.1f} at start",
    )


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--quick", action="store_true", help="short lengths and few repeats: a smoke run")
    parser.add_argument("--cases", default="prefill,decode,train,memory", help="comma-separated subset")
    parser.add_argument("--lengths", type=_int_list, help="text-130m prefill lengths (default 256,1024,4096)")
    parser.add_argument("--repeats", type=int, help="timed repeats per candidate (default 3; 1 with --quick)")
    parser.add_argument("--long", action="store_true", help="also prefill L=16384 (ours vs Llama)")
    parser.add_argument("--out", help="results name or path (default text_<device>[_quick])")
    parser.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.lengths = args.lengths or ([128] if quick else [256, 1024, 4096])
    args.repeats = args.repeats or (1 if quick else 3)
    args.narrow_lengths = [256] if quick else [1024, 4096]
    args.contexts = [256, 1024] if quick else [1024, 8192, 32768]
    args.new_tokens = 4 if quick else 32
    args.warmup_tokens = 2 if quick else 4
    args.train_length = 128 if quick else 1024
    args.memory_context = 1024 if quick else 32768
    every_model = [OURS, MAMBA_HF, LLAMA]
    args.memory_models = (
        {"decode": [OURS, LLAMA], "train": [OURS]} if quick else {"decode": every_model, "train": every_model}
    )
    args.out = args.out or f"text_{args.device}" + ("_quick" if quick else "")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not args.memory_case:
        from benchmarks.bench_gpu import main as gpu_main

        print(
            "--device cuda: running benchmarks.bench_gpu --suite text (results/text_<gpu>.json)", flush=True
        )
        gpu_main(["--suite", "text", "--dtype", args.dtype, *(["--quick"] if args.quick else [])])
        return
    hf_logging.set_verbosity_error()  # transformers' "kernel not installed" notices, once per process
    device, dtype = args.device, DTYPES[args.dtype]
    if args.memory_case:
        emit_memory_result(memory_child(json.loads(args.memory_case), device, dtype))
        return
    cases = set(args.cases.split(","))
    unknown = cases - {"prefill", "decode", "train", "memory"}
    if unknown:
        raise SystemExit(f"Unknown case(s) {sorted(unknown)}; choose from prefill, decode, train, memory.")
    started = time.time()
    notes: list[str] = []
    results: dict[str, Any] = {
        "machine": machine_info(args.device, args.dtype),
        "models": LABELS,
        "notes": notes,
    }

    config = mamba_config()
    ours, reference = build_mamba_pair(config, device, dtype)
    ours_params = param_count(ours)
    llama_cfg, llama_record = matched_llama_config(ours_params, num_hidden_layers=12)
    llama = build_model(LLAMA, llama_cfg, device, dtype)
    narrow = mamba_config(hidden_size=256, num_hidden_layers=4)
    train_config = mamba_config(num_hidden_layers=6)
    train_llama_cfg, train_llama_record = matched_llama_config(
        meta_param_count(VLMambaForCausalLM, train_config), num_hidden_layers=3
    )
    print(
        f"params: ours {ours_params:,}  llama {llama_record['params']:,} ({llama_record['params_relative_to_ours']:+.1%})"
    )
    results["config"] = {
        "text-130m": {**config.to_diff_dict(), "params": ours_params},
        "narrow": {**narrow.to_diff_dict(), "params": None},
        "llama": {**llama_cfg.to_diff_dict(), **llama_record},
        "train-6-layer": {
            **train_config.to_diff_dict(),
            "params": meta_param_count(VLMambaForCausalLM, train_config),
        },
        "train-llama": {**train_llama_cfg.to_diff_dict(), **train_llama_record},
        "args": {k: v for k, v in vars(args).items() if k != "memory_case"},
    }
    notes.append(
        "Llama baselines tie their embeddings (as Mamba does); untied, the 12-layer Llama has 162M "
        "parameters, 26% above ours, all of it a second vocab matrix."
    )

    if "prefill" in cases:
        narrow_models = build_mamba_pair(narrow, device, dtype)
        results["config"]["narrow"]["params"] = param_count(narrow_models[0])
        results["prefill"] = run_prefill(args, (ours, reference, llama), narrow_models, device, dtype, notes)
        del narrow_models
    if "decode" in cases:
        results["decode"] = run_decode(args, (ours, reference, llama), llama_cfg, device, dtype, notes)
    del ours, reference, llama
    if "train" in cases:
        results["train"] = run_train(
            args, train_config, train_llama_cfg, train_llama_record, device, dtype, notes
        )
        tps = results["train"]["tokens_per_s"]
        print("  train: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in tps.items()))
    if "memory" in cases:
        decode_layers = {OURS: 24, MAMBA_HF: 24, LLAMA: llama_cfg.num_hidden_layers}
        train_layers = {OURS: 6, MAMBA_HF: 6, LLAMA: train_llama_cfg.num_hidden_layers}
        results["memory"] = run_memory(args, decode_layers, train_layers, notes)
    results["elapsed_s"] = time.time() - started
    results["machine"]["load_average_at_end"] = list(os.getloadavg())

    json_path = write_json(args.out, results)
    print_tables(results)
    if "prefill" in results or "decode" in results:
        plot(results, args.out)
    print(f"\nwrote {json_path} (and .png) in {results['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()

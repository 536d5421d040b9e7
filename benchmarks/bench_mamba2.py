"""Mamba-2 benchmark: our Mamba-2 LM against transformers' Mamba2ForCausalLM, our Mamba-1 and a Llama.

Cases: prefill tokens/s (batch 1); training-step tokens/s at L = 4096 against transformers' Mamba-2, for the
backbone alone (where the code under test lives) and for the full LM loss (whose vocab projection and cross
entropy are the same matmuls in every model), and at L = 1024 against every baseline; decode ms/token against
context length. Every timing runs the candidates side by side in
this process on the same random inputs, alternating after a warm-up; ratios are ours / baseline throughput
(above 1: ours is faster).

Models (random weights, nothing downloaded): the state-spaces/mamba2-130m shape (hidden 768, state 128,
head_dim 64, 1 group, chunk 256, vocab 50280, tied embeddings; 129M parameters at 24 layers), our Mamba-1 at
the text-130m shape (same width and depth, also 129M) and a parameter-matched Llama (SDPA). Prefill and
training use 6-layer variants of all of them so that the run fits in about 10 minutes on 2 CPU cores;
decode uses the full 24 layers.

    python -m benchmarks.bench_mamba2                      # -> benchmarks/results/mamba2_cpu.{json,png}
    python -m benchmarks.bench_mamba2 --threads 1          # steadier ratios on a busy shared machine
    python -m benchmarks.bench_mamba2 --quick              # smoke run, about a minute
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: nothing may download

import torch
from transformers import LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig
from transformers.utils import logging as hf_logging

from benchmarks.bench_text import (
    cache_states,
    decode_step_fn,
    matched_llama_config,
    prefill_fn,
    random_kv_cache,
    random_recurrent_states,
    recurrent_cache,
    train_step_fn,
)
from benchmarks.common import (
    DTYPES,
    compare,
    format_table,
    machine_info,
    param_count,
    plot_panels,
    random_token_ids,
    ratio,
    wait_for_quiet_machine,
    write_json,
)
from vlm_mamba_hf import VLMambaForCausalLM

OURS, MAMBA2_HF, OURS_M1, LLAMA = "ours_mamba2", "mamba2_hf", "ours_mamba1", "llama"
LABELS = {
    OURS: "VLMambaForCausalLM with a Mamba2Config (chunked SSD in PyTorch on CPU)",
    MAMBA2_HF: "transformers Mamba2ForCausalLM (its PyTorch path on CPU), same weights",
    OURS_M1: "VLMambaForCausalLM with a MambaConfig (Mamba-1), text-130m shape",
    LLAMA: "transformers LlamaForCausalLM (SDPA), parameter-matched, tied embeddings",
}
BASELINES = (MAMBA2_HF, OURS_M1, LLAMA)
VOCAB = 50280


def mamba2_config(num_hidden_layers: int = 24) -> Mamba2Config:
    """The state-spaces/mamba2-130m shape (129M parameters at 24 layers)."""
    return Mamba2Config(
        hidden_size=768,
        num_hidden_layers=num_hidden_layers,
        vocab_size=VOCAB,
        state_size=128,
        head_dim=64,
        num_heads=24,
        n_groups=1,
        expand=2,
        conv_kernel=4,
        chunk_size=256,
        tie_word_embeddings=True,
    )


def mamba1_config(num_hidden_layers: int = 24) -> MambaConfig:
    """text-130m (state-spaces/mamba-130m-hf shape)."""
    return MambaConfig(hidden_size=768, num_hidden_layers=num_hidden_layers, vocab_size=VOCAB, state_size=16)


def build_models(layers: int, device: str, dtype: torch.dtype, llama_layers: int) -> tuple[dict, dict]:
    """All four models with `layers` Mamba layers; transformers' Mamba-2 holds exactly our Mamba-2's weights."""
    torch.manual_seed(0)
    config = mamba2_config(layers)
    ours = VLMambaForCausalLM(config)
    reference = Mamba2ForCausalLM(config)
    reference.load_state_dict(ours.state_dict())
    mamba1 = VLMambaForCausalLM(mamba1_config(layers))
    llama_cfg, llama_record = matched_llama_config(param_count(ours), num_hidden_layers=llama_layers)
    llama = LlamaForCausalLM(llama_cfg)
    models = {OURS: ours, MAMBA2_HF: reference, OURS_M1: mamba1, LLAMA: llama}
    models = {name: m.to(device=device, dtype=dtype).eval() for name, m in models.items()}
    record = {
        "mamba2": {**config.to_diff_dict(), "params": param_count(ours)},
        "mamba1": {"num_hidden_layers": layers, "params": param_count(mamba1)},
        "llama": {**llama_cfg.to_diff_dict(), **llama_record},
    }
    return models, record


def backbone_train_step_fn(model, input_ids: torch.Tensor) -> Callable[[], Any]:
    """Forward + backward through the backbone only (embeddings, Mamba layers, final norm), no vocab head."""

    def step():
        model.zero_grad(set_to_none=True)
        model.backbone(input_ids, use_cache=False).last_hidden_state.float().pow(2).mean().backward()

    return step


def random_mamba2_states(config: Mamba2Config, device: str, dtype: torch.dtype, generator: torch.Generator):
    """Random per-layer Mamba-2 states of the cache's shapes: conv (1, conv_dim, k), SSM (1, h, p, n) fp32."""
    conv_dim = config.expand * config.hidden_size + 2 * config.n_groups * config.state_size
    shape = (1, config.num_heads, config.head_dim, config.state_size)
    layers = range(config.num_hidden_layers)
    conv = [
        torch.randn(1, conv_dim, config.conv_kernel, generator=generator).to(device, dtype) for _ in layers
    ]
    ssm = [torch.randn(*shape, generator=generator).to(device) for _ in layers]
    return conv, ssm


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------


def _record(length: int, timings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tps = {name: length / t["median_s"] for name, t in timings.items()}
    out: dict[str, Any] = {"tokens_per_s": tps, "timings": timings}
    for baseline in BASELINES:
        if baseline in tps:
            out[f"ratio_vs_{baseline}"] = ratio(tps[OURS], tps[baseline])
    return out


def run_prefill(args, models, device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    out = {}
    for length in args.lengths:
        ids = random_token_ids(1, length, VOCAB, generator, device)
        candidates = {name: prefill_fn(m, ids) for name, m in models.items()}
        with torch.inference_mode():
            timings = compare(candidates, device, repeats=args.repeats, warmup=1)
        out[str(length)] = _record(length, timings)
        tps = out[str(length)]["tokens_per_s"]
        print(f"  prefill L={length}: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in tps.items()), flush=True)
    return out


def run_train(args, models, device) -> dict[str, Any]:
    """Training-step tokens/s for each (loss, length, candidates) of `args.train_cases`."""
    generator = torch.Generator().manual_seed(2)
    for model in models.values():
        model.train()
    out = {}
    for kind, length, names, repeats in args.train_cases:
        ids = random_token_ids(1, length, VOCAB, generator, device)
        labels = random_token_ids(1, length, VOCAB, generator, device)
        candidates = {
            name: backbone_train_step_fn(models[name], ids)
            if kind == "backbone"
            else train_step_fn(models[name], ids, labels)
            for name in names
        }
        record = _record(length, compare(candidates, device, repeats=repeats, warmup=1))
        out[f"{kind}_L{length}"] = {"loss": kind, "length": length, **record}
        tps = record["tokens_per_s"]
        print(
            f"  train ({kind}) L={length}: " + ", ".join(f"{n} {v:.0f} tok/s" for n, v in tps.items()),
            flush=True,
        )
    for model in models.values():
        model.eval()
    return out


def run_decode(args, models, llama_cfg, device, dtype) -> dict[str, Any]:
    """Decode ms/token (batch 1) after each context; only the decode steps are timed."""
    generator = torch.Generator().manual_seed(3)
    m2_config, m1_config = models[OURS].config, models[OURS_M1].config
    out = {}
    for context in args.contexts:
        record: dict[str, Any] = {}
        with torch.inference_mode():
            if context <= args.real_prefill_max:
                ids = random_token_ids(1, context, VOCAB, generator, device)
                m2_states = cache_states(models[OURS](ids, use_cache=True, logits_to_keep=1).cache)
                m1_states = cache_states(models[OURS_M1](ids, use_cache=True, logits_to_keep=1).cache)
                record["state_source"] = "real prefill by ours"
            else:
                m2_states = random_mamba2_states(m2_config, device, dtype, generator)
                m1_states = random_recurrent_states(m1_config, device, dtype, generator)
                record["state_source"] = "random state (same shapes as after a prefill)"
            tokens = random_token_ids(1, args.warmup_tokens + args.new_tokens, VOCAB, generator, device)
            candidates = {
                OURS: decode_step_fn(models[OURS], recurrent_cache(m2_config, *m2_states), tokens),
                MAMBA2_HF: decode_step_fn(models[MAMBA2_HF], recurrent_cache(m2_config, *m2_states), tokens),
                OURS_M1: decode_step_fn(models[OURS_M1], recurrent_cache(m1_config, *m1_states), tokens),
                LLAMA: decode_step_fn(
                    models[LLAMA], random_kv_cache(llama_cfg, context, device, dtype, generator), tokens
                ),
            }
            timings = compare(candidates, device, repeats=args.new_tokens, warmup=args.warmup_tokens)
        ms = {name: 1000 * t["median_s"] for name, t in timings.items()}
        record.update(
            ms_per_token=ms, timings=timings, **{f"ratio_vs_{b}": ratio(ms[b], ms[OURS]) for b in BASELINES}
        )
        out[str(context)] = record
        print(
            f"  decode context={context}: " + ", ".join(f"{n} {v:.1f} ms/token" for n, v in ms.items()),
            flush=True,
        )
        del candidates
    return out


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def print_tables(results: dict[str, Any]) -> None:
    names = (OURS, MAMBA2_HF, OURS_M1, LLAMA)
    ratio_headers = [f"x {b}" for b in BASELINES]
    if "prefill" in results:
        rows = [
            [
                int(length),
                *(r["tokens_per_s"].get(n) for n in names),
                *(r.get(f"ratio_vs_{b}") for b in BASELINES),
            ]
            for length, r in results["prefill"].items()
        ]
        print("\nPrefill, batch 1, 6-layer variants (tokens/s; ratio = ours / baseline)")
        print(format_table(["L", *names, *ratio_headers], rows))
    if "train" in results:
        rows = [
            [
                r["loss"],
                r["length"],
                *(r["tokens_per_s"].get(n) for n in names),
                *(r.get(f"ratio_vs_{b}") for b in BASELINES),
            ]
            for r in results["train"].values()
        ]
        print("\nTraining step (fwd + bwd), 6-layer variants (tokens/s; ratio = ours / baseline)")
        print(format_table(["loss", "L", *names, *ratio_headers], rows))
    if "decode" in results:
        rows = [
            [int(c), *(r["ms_per_token"][n] for n in names), *(r[f"ratio_vs_{b}"] for b in BASELINES)]
            for c, r in results["decode"].items()
        ]
        print("\nDecode, batch 1, 24 layers (ms/token; ratio = baseline ms / ours ms)")
        print(format_table(["context", *names, *ratio_headers], rows))


def plot(results: dict[str, Any], path: str) -> None:
    names = (OURS, MAMBA2_HF, OURS_M1, LLAMA)
    prefill = results.get("prefill", {})
    decode = results.get("decode", {})
    info = results["machine"]
    plot_panels(
        path,
        [
            {
                "title": "Prefill, batch 1 (6 layers)",
                "xlabel": "sequence length L",
                "ylabel": "tokens / s",
                "series": {
                    n: ([int(k) for k in prefill], [r["tokens_per_s"][n] for r in prefill.values()])
                    for n in names
                },
                "logx": True,
                "logy": True,
            },
            {
                "title": "Decode, batch 1 (24 layers)",
                "xlabel": "context length",
                "ylabel": "ms / token",
                "series": {
                    n: ([int(k) for k in decode], [r["ms_per_token"][n] for r in decode.values()])
                    for n in names
                },
                "logx": True,
                "logy": True,
            },
        ],
        title=f"Mamba-2 130m shape, {info['device']} {info['dtype']}, {info['cpu']}, {info['torch_threads']} threads, "
        f"torch {info['torch']}, transformers {info['transformers']}, load {info['load_average_at_start'][0]:.1f}",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--quick", action="store_true", help="short lengths, few repeats: a smoke run")
    parser.add_argument("--cases", default="prefill,train,decode", help="comma-separated subset")
    parser.add_argument("--out", help="results name or path (default mamba2_<device>[_quick])")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument(
        "--wait-load", type=float, help="first wait until the 1-minute load average is below this"
    )
    parser.add_argument("--wait-minutes", type=float, default=30.0, help="give up waiting after this long")
    args = parser.parse_args(argv)
    quick = args.quick
    args.lengths = [256] if quick else [1024, 4096]
    args.repeats = 1 if quick else 3
    every, pair = [OURS, MAMBA2_HF, OURS_M1, LLAMA], [OURS, MAMBA2_HF]
    # (loss, length, models, timed repeats): at L = 4096 the step takes tens of seconds per model, so the
    # full LM loss there is ours against transformers' Mamba-2 only; every model at L = 1024.
    args.train_cases = (
        [("backbone", 256, pair, 1), ("lm_loss", 256, every, 1)]
        if quick
        else [("backbone", 4096, pair, 2), ("lm_loss", 4096, pair, 1), ("lm_loss", 1024, every, 2)]
    )
    args.contexts = [256, 1024] if quick else [1024, 8192, 32768]
    args.real_prefill_max = 1024
    args.new_tokens = 4 if quick else 16
    args.warmup_tokens = 2 if quick else 4
    args.out = args.out or f"mamba2_{args.device}" + ("_quick" if quick else "")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # transformers' "kernel not installed" notices
    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = set(args.cases.split(","))
    load = wait_for_quiet_machine(args.wait_load, args.wait_minutes)
    started = time.time()
    machine = {**machine_info(device, args.dtype), "load_wait": load}
    results: dict[str, Any] = {"machine": machine, "models": LABELS, "config": {}}
    results["notes"] = [
        "Prefill and training use 6-layer variants of every model (Llama parameter-matched to our 6-layer "
        "Mamba-2) so that the run fits in about 10 minutes on 2 CPU cores (24 layers at L = 4096 would also "
        "need about 15 GB for transformers' saved activations); decode uses 24 layers.",
        "Training: 'lm_loss' is fwd + bwd of the causal-LM loss over the 50280-word vocabulary (the vocab "
        "projection and its loss, identical in every model, are most of that step at 6 layers); 'backbone' is "
        "fwd + bwd of the backbone alone (mean square of the last hidden state), ours against transformers' "
        "Mamba-2. No optimizer step.",
        "Our PyTorch SSD uses chunks of min(chunk_size, 64) on CPU (same result); transformers' uses chunk_size "
        "(256 in this config).",
        "Decode: transformers' Mamba-2 decodes from a copy of our Mamba-2 state (same cache layout); Llama's "
        "DynamicCache holds random keys/values for the context; beyond 1024 the Mamba states are random (decode "
        "cost does not depend on their values).",
    ]
    if cases & {"prefill", "train"}:
        models, record = build_models(6, device, dtype, llama_layers=3)
        results["config"]["6-layer"] = record
        print("6-layer params: " + ", ".join(f"{n} {param_count(m) / 1e6:.1f}M" for n, m in models.items()))
        if "prefill" in cases:
            results["prefill"] = run_prefill(args, models, device)
        if "train" in cases:
            results["train"] = run_train(args, models, device)
        del models
    if "decode" in cases:
        models, record = build_models(24, device, dtype, llama_layers=12)
        results["config"]["24-layer"] = record
        print("24-layer params: " + ", ".join(f"{n} {param_count(m) / 1e6:.1f}M" for n, m in models.items()))
        llama_cfg = models[LLAMA].config
        results["decode"] = run_decode(args, models, llama_cfg, device, dtype)
        del models
    results["config"]["args"] = vars(args)
    results["elapsed_s"] = time.time() - started
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    json_path = write_json(args.out, results)
    print_tables(results)
    if "prefill" in results or "decode" in results:
        plot(results, args.out)
    print(f"\nwrote {json_path} (and .png) in {results['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()

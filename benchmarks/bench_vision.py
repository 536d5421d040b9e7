"""Vision-tower benchmark: VLMambaVisionModel (Vim-tiny shape) against a ViT and a SigLIP of its size.

Cases (BENCHMARKS.md, "vision tower"): inference images/s and peak memory at 224, 448 and 896 px (196,
784 and 3,136 patches), batch 1, plus batch 8 at 224 px. The towers keep their 224 px configs; larger
inputs interpolate the position embeddings (ours always, ViT and SigLIP via `interpolate_pos_encoding`).
Every timing runs the candidates side by side in this process on the same random pixels, alternating
after a warm-up, and reports medians and ratios; memory is measured per case in a fresh subprocess.

    python -m benchmarks.bench_vision --quick          # smoke run (32 and 64 px), well under a minute
    python -m benchmarks.bench_vision                  # full run -> benchmarks/results/vision_cpu.{json,png}
    python -m benchmarks.bench_vision --device cuda --dtype bfloat16
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
from transformers import SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel
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
    ratio,
    run_memory_case,
    wait_for_quiet_machine,
    write_json,
)
from vlm_mamba_hf import VLMambaVisionConfig, VLMambaVisionModel

MODULE = "benchmarks.bench_vision"
OURS, VIT, SIGLIP, VIT12 = "ours", "vit", "siglip", "vit_12"
BASELINES = (VIT, SIGLIP, VIT12)
LABELS = {
    OURS: "VLMambaVisionModel, Vim-tiny shape (hidden 192, 24 bidirectional layers, patch 16)",
    VIT: "transformers ViTModel (SDPA), hidden 192, 3 heads, intermediate 768, depth parameter-matched",
    SIGLIP: "transformers SiglipVisionModel (SDPA, no pooling head), same width, depth parameter-matched",
    VIT12: "transformers ViTModel (SDPA), BENCHMARKS.md's named match: 12 layers (not parameter-matched)",
}
BASE_IMAGE_SIZE = 224  # every tower is configured for 224 px; other sizes interpolate position embeddings
PATCH = 16
WIDTH, HEADS, MLP = 192, 3, 768
OURS_LAYERS = 24
VIT_LAYERS = 12  # BENCHMARKS.md's ViT match; moved to the nearest parameter match when more than 10% off
PARAM_TOLERANCE = 0.10
TARGET_SIZE = 896  # the target: >= 2x ViT images/s and <= 0.5x ViT peak memory at 896 px
TARGET_SPEEDUP, TARGET_MEMORY_FRACTION = 2.0, 0.5


# ----------------------------------------------------------------------------------------------------------
# Configs and models
# ----------------------------------------------------------------------------------------------------------


def ours_config(num_hidden_layers: int = OURS_LAYERS) -> VLMambaVisionConfig:
    """vision-tiny: Vim-tiny's shape at 224 px."""
    return VLMambaVisionConfig(
        image_size=BASE_IMAGE_SIZE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=num_hidden_layers
    )


def baseline_config(name: str, num_hidden_layers: int) -> ViTConfig | SiglipVisionConfig:
    """ViT or SigLIP vision config of ours' width with `num_hidden_layers` layers, SDPA attention."""
    kwargs = dict(
        hidden_size=WIDTH,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        image_size=BASE_IMAGE_SIZE,
        patch_size=PATCH,
        attn_implementation="sdpa",
    )
    if name == SIGLIP:
        return SiglipVisionConfig(vision_use_head=False, **kwargs)
    return ViTConfig(**kwargs)


def build_model(name: str, layers: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """One tower by name with random weights (memory subprocesses build only the one they measure)."""
    torch.manual_seed(seed)
    if name == OURS:
        model = VLMambaVisionModel(ours_config(layers), mode="encoder")
    elif name == SIGLIP:
        model = SiglipVisionModel(baseline_config(SIGLIP, layers))
    else:
        model = ViTModel(baseline_config(VIT, layers), add_pooling_layer=False)
    return model.to(device=device, dtype=dtype).eval()


def meta_param_count(name: str, layers: int) -> int:
    """Parameter count of a tower without allocating or initialising any weights."""
    with torch.device("meta"):
        return param_count(build_model(name, layers, "meta", torch.float32))


def matched_layers(name: str, target_params: int, requested: int) -> dict[str, Any]:
    """`requested` layers, or the layer count nearest `target_params` when that one is more than 10% off."""
    params = meta_param_count(name, requested)
    record: dict[str, Any] = {
        "requested_layers": requested,
        "requested_params": params,
        "layers_adjusted": False,
    }
    layers = requested
    if abs(params / target_params - 1) > PARAM_TOLERANCE:
        per_layer = meta_param_count(name, requested + 1) - params
        layers = max(1, round(requested + (target_params - params) / per_layer))
        params = meta_param_count(name, layers)
        record["layers_adjusted"] = True
    record.update(num_hidden_layers=layers, params=params, params_relative_to_ours=params / target_params - 1)
    if abs(params / target_params - 1) > PARAM_TOLERANCE:
        raise AssertionError(f"No {name} depth within 10% of {target_params} parameters (best: {params}).")
    return record


# ----------------------------------------------------------------------------------------------------------
# What is timed
# ----------------------------------------------------------------------------------------------------------


def random_pixels(batch: int, size: int, device: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normalised-image-like random pixels (b, 3, size, size): never zeros."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).clamp_(-1, 1).to(device=device, dtype=dtype)


def forward_fn(name: str, model: torch.nn.Module, pixels: torch.Tensor) -> Callable[[], Any]:
    """One inference forward of the tower on `pixels`; baselines interpolate position embeddings off 224 px."""
    if name == OURS:
        return lambda: model(pixel_values=pixels)
    interpolate = pixels.shape[-1] != BASE_IMAGE_SIZE
    return lambda: model(pixel_values=pixels, interpolate_pos_encoding=interpolate)


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------


def cases(args) -> list[tuple[int, int]]:
    """(batch, image size) pairs: batch 1 at every size, then batch 8 at the smallest size."""
    out = [(1, size) for size in args.sizes]
    if args.batch8:
        out.append((8, min(args.sizes)))
    return out


def case_key(batch: int, size: int) -> str:
    return f"b{batch}_{size}px"


def run_throughput(
    args, models: dict[str, torch.nn.Module], device: str, dtype: torch.dtype
) -> dict[str, Any]:
    """Images/s per case, all towers side by side on the same pixels."""
    out: dict[str, Any] = {}
    for batch, size in cases(args):
        pixels = random_pixels(batch, size, device, dtype, seed=size + batch)
        candidates = {name: forward_fn(name, model, pixels) for name, model in models.items()}
        start = time.time()
        with torch.no_grad():
            timings = compare(candidates, device, repeats=args.repeats, warmup=args.warmup)
        images_per_s = {name: batch / t["median_s"] for name, t in timings.items()}
        out[case_key(batch, size)] = {
            "batch": batch,
            "image_size": size,
            "patches": (size // PATCH) ** 2,
            "images_per_s": images_per_s,
            "timings": timings,
            **{
                f"speed_ratio_vs_{b}": ratio(images_per_s[OURS], images_per_s[b]) for b in models if b != OURS
            },
        }
        summary = ", ".join(f"{n} {v:.2f} img/s" for n, v in images_per_s.items())
        print(f"  {case_key(batch, size)}: {summary} ({time.time() - start:.0f}s)", flush=True)
    return out


def run_memory(args, layers: dict[str, int]) -> dict[str, Any]:
    """Peak memory above the built tower per case and model, each in a fresh subprocess (--quick: the
    last case only, since every subprocess pays the imports again)."""
    common = ["--device", args.device, "--dtype", args.dtype]
    out: dict[str, Any] = {}
    for batch, size in cases(args)[-1:] if args.quick else cases(args):
        key = case_key(batch, size)
        out[key] = {}
        for name, depth in layers.items():
            spec = {"model": name, "layers": depth, "batch": batch, "image_size": size}
            start = time.time()
            out[key][name] = run_memory_case(MODULE, [*common, "--_memory-case", json.dumps(spec)])
            mib = out[key][name]["peak_above_baseline_mib"]
            print(f"  memory {key} {name}: {mib:.1f} MiB ({time.time() - start:.0f}s)", flush=True)
        peaks = {name: r["peak_above_baseline_mib"] for name, r in out[key].items()}
        for b in layers:
            if b != OURS:
                out[key][f"memory_ratio_{b}_over_ours"] = ratio(peaks[b], peaks[OURS])
    return out


def memory_child(spec: dict[str, Any], device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Runs in the subprocess: build one tower and its input, take the baseline, one forward, the peak."""
    name = spec["model"]
    model = build_model(name, spec["layers"], device, dtype)
    pixels = random_pixels(spec["batch"], spec["image_size"], device, dtype, seed=spec["image_size"])
    baseline = memory_baseline(device)
    with torch.no_grad():
        forward_fn(name, model, pixels)()
    return {**memory_peak(baseline), **spec, "params": param_count(model)}


def target_check(results: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's 896 px target against the parameter-matched ViT, when that case was run."""
    key = case_key(1, TARGET_SIZE)
    if key not in results.get("memory", {}) or VIT not in results["memory"][key]:
        return None
    speed = results["throughput"][key][f"speed_ratio_vs_{VIT}"]
    memory = results["memory"][key]
    fraction = ratio(memory[OURS]["peak_above_baseline_mib"], memory[VIT]["peak_above_baseline_mib"])
    return {
        "case": key,
        "speed_ratio_vs_vit": speed,
        "speed_target": TARGET_SPEEDUP,
        "speed_met": speed is not None and speed >= TARGET_SPEEDUP,
        "memory_fraction_of_vit": fraction,
        "memory_target": TARGET_MEMORY_FRACTION,
        "memory_met": fraction is not None and fraction <= TARGET_MEMORY_FRACTION,
    }


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def print_tables(results: dict[str, Any], names: list[str]) -> None:
    """The short human-readable summary printed at the end of a run."""
    baselines = [n for n in names if n != OURS]
    rows = []
    for r in results["throughput"].values():
        ips = r["images_per_s"]
        rows.append(
            [
                r["batch"],
                r["image_size"],
                r["patches"],
                *(ips[n] for n in names),
                *(r[f"speed_ratio_vs_{b}"] for b in baselines),
            ]
        )
    print("\nImages/s (ratio = ours / baseline images/s: above 1 means ours is faster)")
    print(format_table(["batch", "px", "patches", *names, *(f"x {b}" for b in baselines)], rows))
    if "memory" in results:
        rows = []
        for key, by_model in results["memory"].items():
            batch, size = results["throughput"][key]["batch"], results["throughput"][key]["image_size"]
            rows.append(
                [
                    batch,
                    size,
                    *(by_model[n]["peak_above_baseline_mib"] for n in names),
                    *(by_model[f"memory_ratio_{b}_over_ours"] for b in baselines),
                ]
            )
        print("\nPeak memory above the built tower (MiB, fresh process per cell; ratio = baseline / ours)")
        print(format_table(["batch", "px", *names, *(f"{b}/ours" for b in baselines)], rows))
    target = results.get("target")
    if target:
        print(
            f"\nTarget at {TARGET_SIZE} px vs the parameter-matched ViT: speed x{target['speed_ratio_vs_vit']:.2f} "
            f"(need >= {TARGET_SPEEDUP}: {'met' if target['speed_met'] else 'NOT met'}), memory "
            f"{target['memory_fraction_of_vit']:.2f}x ViT (need <= {TARGET_MEMORY_FRACTION}: "
            f"{'met' if target['memory_met'] else 'NOT met'})"
        )


def plot(results: dict[str, Any], names: list[str], path: str) -> None:
    """Two panels against image size (batch 1): images/s and peak memory."""
    batch1 = {k: r for k, r in results["throughput"].items() if r["batch"] == 1}
    sizes = [r["image_size"] for r in batch1.values()]
    panels = [
        {
            "title": "Vision tower inference, batch 1",
            "xlabel": "image size (px; 224 -> 196 patches, 896 -> 3136)",
            "ylabel": "images / s",
            "series": {n: (sizes, [r["images_per_s"][n] for r in batch1.values()]) for n in names},
            "logx": False,
            "logy": True,
        }
    ]
    measured = [k for k in batch1 if k in results.get("memory", {})]
    if measured:
        memory_sizes = [batch1[k]["image_size"] for k in measured]
        panels.append(
            {
                "title": "Peak memory above the built tower, batch 1",
                "xlabel": "image size (px)",
                "ylabel": "MiB",
                "series": {
                    n: (memory_sizes, [results["memory"][k][n]["peak_above_baseline_mib"] for k in measured])
                    for n in names
                },
                "logx": False,
                "logy": True,
            }
        )
    info = results["machine"]
    plot_panels(
        path,
        panels,
        title=f"vision-tiny, {info['device']} {info['dtype']}, {info.get('gpu') or info['cpu']}, "
        f"{info['torch_threads']} threads, torch {info['torch']}, transformers {info['transformers']}",
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
    parser.add_argument(
        "--quick", action="store_true", help="32 and 64 px, ours vs ViT, 1 repeat: a smoke run"
    )
    parser.add_argument("--sizes", type=_int_list, help="image sizes in px (default 224,448,896)")
    parser.add_argument("--baselines", help=f"comma-separated subset of {','.join(BASELINES)} (default all)")
    parser.add_argument("--no-batch8", dest="batch8", action="store_false", help="skip batch 8 at 224 px")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory cases")
    parser.add_argument("--repeats", type=int, help="timed repeats per candidate (default 3; 1 with --quick)")
    parser.add_argument(
        "--wait-load",
        type=float,
        help="first wait until the 1-minute load average is below this (shared machines)",
    )
    parser.add_argument("--wait-minutes", type=float, default=40.0, help="give up waiting after this long")
    parser.add_argument("--out", help="results name or path (default vision_<device>[_quick])")
    parser.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = args.sizes or ([32, 64] if quick else [224, 448, 896])
    args.baselines = args.baselines.split(",") if args.baselines else ([VIT] if quick else list(BASELINES))
    unknown = set(args.baselines) - set(BASELINES)
    if unknown:
        parser.error(f"unknown baseline(s) {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    args.batch8 = args.batch8 and not quick
    args.repeats = args.repeats or (1 if quick else 3)
    args.warmup = 1
    args.out = args.out or f"vision_{args.device}" + ("_quick" if quick else "")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    device, dtype = args.device, DTYPES[args.dtype]
    if args.memory_case:
        emit_memory_result(memory_child(json.loads(args.memory_case), device, dtype))
        return
    load = wait_for_quiet_machine(args.wait_load, args.wait_minutes)
    started = time.time()
    ours_params = meta_param_count(OURS, OURS_LAYERS)
    records: dict[str, dict[str, Any]] = {}
    layers = {OURS: OURS_LAYERS}
    for name in args.baselines:
        if name == VIT12:
            params = meta_param_count(VIT, VIT_LAYERS)
            records[name] = {
                "num_hidden_layers": VIT_LAYERS,
                "params": params,
                "params_relative_to_ours": params / ours_params - 1,
                "parameter_matched": False,
            }
        else:
            records[name] = {**matched_layers(name, ours_params, VIT_LAYERS), "parameter_matched": True}
        layers[name] = records[name]["num_hidden_layers"]
    names = list(layers)
    print(f"params: ours {ours_params:,} ({OURS_LAYERS} layers)")
    for name, record in records.items():
        adjusted = " (depth adjusted from 12 to match)" if record.get("layers_adjusted") else ""
        print(
            f"        {name} {record['params']:,} ({record['num_hidden_layers']} layers, "
            f"{record['params_relative_to_ours']:+.1%}){adjusted}"
        )

    notes = [
        "images/s = batch / median seconds per forward (torch.no_grad), candidates alternating round by "
        f"round after {args.warmup} warm-up call(s); pixels are random in [-1, 1], the same for every tower.",
        "Every tower is configured for 224 px; larger inputs interpolate the position embeddings (bicubic), "
        "so 448 px gives 784 patches and 896 px 3,136 (ours adds one class token in the middle).",
        "memory: peak RSS (CPU) or max_memory_allocated (GPU) above the built tower and its input, one "
        "forward, each cell in its own fresh process.",
    ]
    if records.get(VIT, {}).get("layers_adjusted"):
        notes.append(
            f"The 12-layer ViT named in BENCHMARKS.md has {records[VIT]['requested_params']:,} parameters, "
            f"{records[VIT]['requested_params'] / ours_params - 1:+.1%} against ours, outside 10%; the "
            f"parameter-matched ViT has {records[VIT]['num_hidden_layers']} layers."
        )
    results: dict[str, Any] = {
        "machine": {**machine_info(device, args.dtype), "load_wait": load},
        "models": {n: LABELS[n] for n in names},
        "config": {
            OURS: {**ours_config().to_diff_dict(), "params": ours_params, "mode": "encoder"},
            **{n: {**baseline_config(n, layers[n]).to_diff_dict(), **r} for n, r in records.items()},
            "args": {k: v for k, v in vars(args).items() if k != "memory_case"},
        },
        "notes": notes,
    }
    models = {name: build_model(name, depth, device, dtype) for name, depth in layers.items()}
    for name, model in models.items():
        assert param_count(model) == (ours_params if name == OURS else records[name]["params"]), name
    results["throughput"] = run_throughput(args, models, device, dtype)
    del models
    if args.memory:
        results["memory"] = run_memory(args, {n: layers[n] for n in names})
    results["target"] = target_check(results)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["elapsed_s"] = time.time() - started

    json_path = write_json(args.out, results)
    print_tables(results, names)
    plot(results, names, args.out)
    print(f"\nwrote {json_path} (and .png) in {results['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()

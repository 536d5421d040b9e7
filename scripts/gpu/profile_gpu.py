"""Where the GPU time goes: prefill at 16k (ours against mamba_ssm) and one decoding step through generate().

Prints, per candidate, the kernels that take the most device time in one prefill, and, for ours with
CUDA graphs, the host-side operators of generate() that run outside the captured graph. Runs on CPU with
--smoke (tiny config) so the plumbing is checked without a GPU:

    python scripts/gpu/profile_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import bench_gpu  # noqa: E402


def table(prof, sort_by: str, rows: int) -> str:
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)


def profile_prefill(name: str, model, ids: torch.Tensor, device: str, rows: int) -> None:
    call = bench_gpu.prefill_call(name, model, {"input_ids": ids})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode():
        for _ in range(2):
            call()
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        wall = time.perf_counter() - start
        with profile(activities=activities) as prof:
            call()
            sync(device)
    sort_by = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(f"\n== prefill {name} L={ids.shape[1]}: {1000 * wall:.1f} ms wall")
    print(table(prof, sort_by, rows))


def profile_decode(model, ids: torch.Tensor, device: str, rows: int, new_tokens: int) -> None:
    one = bench_gpu.generate_call(bench_gpu.OURS_CG, model, {"input_ids": ids}, 1)
    many = bench_gpu.generate_call(bench_gpu.OURS_CG, model, {"input_ids": ids}, new_tokens)
    with torch.inference_mode():
        many()  # compile and capture
        many()
        for label, call in (("1", one), (str(new_tokens), many)):
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            print(f"generate({label} new tokens): {1000 * (time.perf_counter() - start):.1f} ms")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            many()
            sync(device)
    print(f"\n== decode ours_cuda_graphs, host operators over generate({new_tokens}) (self CPU time)")
    print(table(prof, "self_cpu_time_total", rows))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    bench_gpu.SMOKE["on"] = args.smoke
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    length = 64 if args.smoke else args.length
    ssm = bench_gpu.mamba_ssm_status()
    names = [bench_gpu.OURS] + ([bench_gpu.MAMBA_SSM] if ssm["available"] else [])
    ids = torch.randint(3, 1000, (1, length), device=device)
    for name in names:
        model = bench_gpu.build_text_model(name, device, dtype)
        profile_prefill(name, model, ids, device, args.rows)
        if name == bench_gpu.OURS:
            profile_decode(model, ids[:, :1024], device, args.rows, 8 if args.smoke else args.new_tokens)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# One prepared run for a lent H100/H200 (see DEVELOPERS notes): install the prebuilt wheels beside the
# machine's own torch, run the GPU tests, then the GPU benchmarks, and print a short table last.
# Usage (from the repo root, with the wheels copied into .gpu_wheels/, which .gitignore excludes):
#   bash scripts/gpu/run_gpu_checks.sh
set -uo pipefail
WHEELS=${WHEELS:-.gpu_wheels}
pip install -q --no-deps --no-index --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
card=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
python -c "import vlm_mamba_hf.ssm_ops as o; print('kernels:', o.kernels_available())"
python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -n 20 | tee "$OUT/gpu_tests_${card}.txt"
python -m benchmarks.bench_text --device cuda --dtype bfloat16 --out "$OUT/text_${card}.json" 2>&1 | tail -n 40

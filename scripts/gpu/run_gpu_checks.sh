#!/usr/bin/env bash
# One prepared run for a lent H100/H200, under 9 minutes: install the prebuilt wheels beside the machine's
# own torch, run the GPU tests, then the GPU benchmarks within what time is left, and print a short table
# last. Results (JSON, test log) go to $OUT, which the device tool brings back (benchmarks/results without it).
#
# From this machine, once per session (the wheels are git-ignored, so they travel as a carried path):
#   mkdir -p .gpu_wheels && cp /work/shared/wheels/*.whl .gpu_wheels/
#   run(command="bash scripts/gpu/run_gpu_checks.sh", carry=[".gpu_wheels"], timeout_s=600)
# Environment: WHEELS (wheel folder), TOTAL_S (whole-run budget, default 530 s), PYTHON (default python3).
set -uo pipefail
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-530}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
left() { echo $((TOTAL_S - SECONDS)); }

for dir in "${WHEELS:-}" .gpu_wheels shared/wheels ../shared/wheels /work/shared/wheels; do
    if [ -n "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1; then WHEELS=$dir; break; fi
done
if [ -z "${WHEELS:-}" ] || ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels found (.gpu_wheels/, shared/wheels/): mamba_ssm and causal_conv1d paths will be skipped"
else
    "$PYTHON" -m pip install -q --no-deps --no-index --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PYTHON" - <<'PY' || exit 2
import sys
import torch, transformers
import vlm_mamba_hf.ssm_ops as ops
print("torch", torch.__version__, "transformers", transformers.__version__, "kernels", ops.kernels_available())
if not torch.cuda.is_available():
    sys.exit("no CUDA device: nothing to run here (bench_gpu --smoke checks the benchmark on CPU)")
print("gpu", torch.cuda.get_device_name(0))
PY
minutes() { "$PYTHON" -c "print(max(0.5, $1 / 60 - 0.5))"; }

echo "== GPU tests ($(left) s left)"
timeout 240 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -n 40 | tee "$OUT/gpu_tests.txt"

# The text suite gets most of what is left, the VLM suite the rest; --budget-min stops starting new cells,
# the outer timeout stops a cell that runs long (its suite's JSON is then missing; the log says where).
text_s=$(( $(left) * 70 / 100 ))
echo "== bench_gpu text ($(left) s left, budget ${text_s} s)"
timeout $((text_s + 60)) "$PYTHON" -m benchmarks.bench_gpu --suite text --out-dir "$OUT" \
    --budget-min "$(minutes "$text_s")" 2>&1 | grep -v "^\s*$" | tail -n 60 | tee "$OUT/bench_text.log"
vlm_s=$(( $(left) - 45 ))
if [ "$vlm_s" -gt 60 ]; then
    echo "== bench_gpu vlm ($(left) s left, budget ${vlm_s} s)"
    timeout $((vlm_s + 30)) "$PYTHON" -m benchmarks.bench_gpu --suite vlm --out-dir "$OUT" \
        --budget-min "$(minutes "$vlm_s")" 2>&1 | tail -n 30 | tee "$OUT/bench_vlm.log"
else
    echo "== bench_gpu vlm skipped: $(left) s left"
fi

echo "== summary (elapsed ${SECONDS} s)"
grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -n 3
shopt -s nullglob
results=("$OUT"/text_*.json "$OUT"/vlm_gen_*.json)
if [ ${#results[@]} -gt 0 ]; then
    "$PYTHON" -m benchmarks.bench_gpu --summary "${results[@]}" 2>/dev/null | grep -v "^\s*$"
else
    echo "no benchmark results were written (see bench_*.log)"
fi

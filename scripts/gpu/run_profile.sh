#!/usr/bin/env bash
# Short follow-up run for a lent GPU: the LoRA-under-kernels tests, then scripts/gpu/profile_gpu.py.
# run(command="bash scripts/gpu/run_profile.sh", carry=[".gpu_wheels"], timeout_s=240)
set -uo pipefail
OUT=${OUT:-runs}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --target /tmp/site .gpu_wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -k lora -p no:cacheprovider 2>&1 | tail -n 15 | tee "$OUT/gpu_lora_tests.txt"
timeout 110 python3 scripts/gpu/profile_gpu.py 2>&1 | grep -v "^USDT" | tee "$OUT/profile.txt"

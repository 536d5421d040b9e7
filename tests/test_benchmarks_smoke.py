"""Smoke runs of the benchmark scripts: `--quick` (bench_gpu: `--smoke`) finishes and writes the JSON the reports read
(no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_mamba_hf import cpu_kernels
from vlm_mamba_hf.training.recipes import get_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
# Each script's smoke flags; bench_gpu's --smoke runs its GPU cases with tiny models on CPU (no mamba_ssm).
SCRIPTS = {
    "bench_vision": ["--quick"],
    "bench_vlm": ["--quick"],
    "bench_gpu": ["--smoke"],
    "bench_quality": ["--recipe", "tiny", "--quick", "--throughput-steps", "2", "--train-vlmamba"],
}
# The three runs together take about 1.5 minutes on an idle 2-core CPU; the limit leaves room for a busy one.
TIMEOUT_S = 420

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, dict]:
    """Run every script's smoke flags, in parallel subprocesses, each writing to a temporary JSON path."""
    folder = tmp_path_factory.mktemp("bench")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{name}", *flags, "--out", str(folder / name)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, flags in SCRIPTS.items()
    }
    runs = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        paths = {
            "": folder / f"{name}.json",
            "text": folder / f"{name}_text.json",
            "vlm": folder / f"{name}_vlm.json",
        }
        runs[name] = {
            "returncode": proc.returncode,
            "log": (stdout + stderr)[-3000:],
            "data": json.loads(paths[""].read_text()) if paths[""].exists() else None,
            "suites": {k: json.loads(p.read_text()) for k, p in paths.items() if k and p.exists()},
        }
    return runs


def _finished(run: dict) -> dict:
    assert run["returncode"] == 0, run["log"]
    assert run["data"] is not None, "no JSON written:\n" + run["log"]
    return run["data"]


def test_quick_vision_run_writes_images_per_s_memory_and_ratios(quick_runs):
    data = _finished(quick_runs["bench_vision"])
    assert {"machine", "config", "throughput", "memory", "target", "notes"} <= set(data)
    assert "load_average_at_start" in data["machine"]
    assert data["config"]["vit"]["params_relative_to_ours"] <= 0.10
    for case in data["throughput"].values():
        assert case["images_per_s"]["ours"] > 0 and case["images_per_s"]["vit"] > 0
        assert case["speed_ratio_vs_vit"] > 0
    for case in data["memory"].values():
        assert case["ours"]["peak_above_baseline_mib"] >= 0
        assert "memory_ratio_vit_over_ours" in case


def test_quick_vlm_run_writes_seconds_and_ratio_per_case(quick_runs):
    data = _finished(quick_runs["bench_vlm"])
    assert {"machine", "config", "cases", "notes"} <= set(data)
    assert set(data["cases"]) == {"caption", "vqa", "long_prompt"}
    for part in ("vision", "text"):
        assert abs(data["config"]["llava"]["match"][part]["relative_to_ours"]) <= 0.10
    for case in data["cases"].values():
        assert case["seconds"]["ours"] > 0 and case["seconds"]["llava"] > 0
        assert case["ratio_vs_llava"] > 0
        assert case["image_tokens"] > 0


def test_gpu_script_runs_every_case_and_candidate_tiny_on_cpu(quick_runs):
    run = quick_runs["bench_gpu"]
    assert run["returncode"] == 0, run["log"]
    assert set(run["suites"]) == {"text", "vlm"}, run["log"]
    text = run["suites"]["text"]["suites"]["text"]
    assert run["suites"]["text"]["bandwidth"]["bytes_per_s"] > 0
    assert {"decode", "prefill", "train", "memory", "targets"} <= set(text)
    for cell in text["decode"].values():
        assert {"ours", "ours_cuda_graphs", "mamba_hf", "llama"} <= set(cell["tokens_per_s"])
        assert all(v > 0 for v in cell["fraction_of_bandwidth_bound"].values())
    assert all("error" not in r for by_model in text["memory"].values() for r in by_model.values())
    vlm = run["suites"]["vlm"]["suites"]["vlm"]
    assert {"ours", "ours_cuda_graphs", "llava"} <= set(next(iter(vlm["decode"].values()))["tokens_per_s"])
    assert all("error" not in r for by_model in vlm["memory"].values() for r in by_model.values())


def test_quick_quality_run_trains_both_models_and_writes_the_table(quick_runs):
    data = _finished(quick_runs["bench_quality"])
    assert {"machine", "recipe", "runs", "throughput", "table"} <= set(data)
    for name in ("vlmamba", "llava"):
        run = data["runs"][name]
        assert run["train_steps"] == 4 and run["source"] == "trained in this run"
        assert 0 <= run["eval"]["easy_vqa_test"]["accuracy"] <= 1
        assert data["throughput"][name]["examples_per_second"] > 0
    # LLaVA is parameter-matched per part (within 10%), and its tokens per image follow its patch size.
    for part in ("vision", "text"):
        ours, theirs = data["runs"]["vlmamba"]["parameters"][part], data["runs"]["llava"]["parameters"][part]
        assert abs(theirs - ours) / ours <= 0.10, part
    assert data["throughput"]["ratio_vlmamba_over_llava"] > 0
    assert "| vlmamba |" in data["table"] and "| llava |" in data["table"]
    # Where the fused CPU kernels build, the same alternation also times VLMamba on the pure-PyTorch path.
    if cpu_kernels.load_library() is not None:
        assert data["throughput"]["vlmamba_pytorch_path"]["examples_per_second"] > 0
        assert "pure-PyTorch path" in data["table"]


def test_reusing_a_llava_run_needs_the_same_recipe_and_fields_added_since_count_as_their_old_value():
    from benchmarks.bench_quality import RECIPE_FIELDS_ADDED, recipe_differences

    current = json.loads(json.dumps(get_recipe("default").to_dict()))
    assert recipe_differences(dict(current), current) == []
    older = {k: v for k, v in current.items() if k != "focus_scenes"}  # stored before the field existed
    assert current["focus_scenes"] == RECIPE_FIELDS_ADDED["focus_scenes"]
    assert recipe_differences(older, current) == []
    assert recipe_differences(older, {**current, "focus_scenes": True}) == ["focus_scenes"]
    # Before factored patches existed, runs had the joint projection: not the default recipe's.
    before = {k: v for k, v in current.items() if k != "factored_patches"}
    assert recipe_differences(before, current) == ["factored_patches"]
    # Any other missing field is a difference; so is any changed value.
    assert recipe_differences({k: v for k, v in current.items() if k != "seed"}, current) == ["seed"]
    assert recipe_differences({**current, "learning_rate": 1.0}, current) == ["learning_rate"]

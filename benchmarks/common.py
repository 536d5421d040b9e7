"""Helpers shared by the benchmark scripts: machine info, side-by-side timing, memory, JSON and plots.

The rules these helpers serve are in BENCHMARKS.md: candidates run in one process on the same inputs,
alternating after a warm-up; the median of the repeats and the ratio to each baseline are reported;
memory is measured per case in a fresh subprocess; results land in `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MEMORY_RESULT_PREFIX = "MEMORY_RESULT "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Machine and environment
# ----------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, dtype: str) -> dict[str, Any]:
    """Everything a reader needs to know where a number came from."""
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "dtype": dtype,
        "threading_env": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
        },
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def param_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def random_token_ids(
    batch: int, length: int, vocab_size: int, generator: torch.Generator, device: str = "cpu"
) -> torch.Tensor:
    """Random token ids (b, l) in [1, vocab_size): never zeros, so no timing on a padding-like input."""
    ids = torch.randint(1, vocab_size, (batch, length), generator=generator)
    return ids.to(device)


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    """Wait for queued GPU work so that wall-clock time covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: str) -> float:
    """Seconds for one call of `fn`, synchronised on GPU."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def compare(
    candidates: dict[str, Callable[[], Any]],
    device: str,
    repeats: int | dict[str, int] = 3,
    warmup: int | dict[str, int] = 1,
) -> dict[str, dict[str, Any]]:
    """Time the candidates side by side: warm-up calls first, then rounds that alternate between them.

    Each round runs every candidate that still has repeats left, rotating the order from round to
    round so that none always runs first (or right after the slowest). `repeats` and `warmup` may be
    given per candidate (a slow baseline can get fewer). Returns, per candidate, the median and all
    times in seconds.
    """
    names = list(candidates)
    reps = {n: repeats[n] if isinstance(repeats, dict) else repeats for n in names}
    warm = {n: warmup[n] if isinstance(warmup, dict) else warmup for n in names}
    for i in range(max(warm.values(), default=0)):
        for name in names:
            if i < warm[name]:
                candidates[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(reps.values(), default=0)):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if r < reps[name]:
                times[name].append(time_once(candidates[name], device))
    return {
        n: {
            "median_s": statistics.median(times[n]),
            "times_s": times[n],
            "repeats": reps[n],
            "warmup": warm[n],
        }
        for n in names
        if times[n]
    }


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3' (for result file names)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def ratio(ours: float, baseline: float) -> float | None:
    """ours / baseline (for throughputs: above 1 means ours is faster); None when undefined."""
    return ours / baseline if ours is not None and baseline else None


# ----------------------------------------------------------------------------------------------------------
# Memory (always in a fresh subprocess)
# ----------------------------------------------------------------------------------------------------------


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak counts from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> tuple[int, str]:
    """The process's peak RSS: VmHWM on Linux, else ru_maxrss.

    On Linux ru_maxrss also keeps the peak of the parent at fork (execve folds the old address space's
    high-water mark into it), and `clear_refs` cannot reset that part; VmHWM is the same kernel counter
    for this address space alone.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def memory_baseline(device: str) -> dict[str, Any]:
    """Call right after the model is built: the reference that `memory_peak` subtracts."""
    if device == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        return {"device": device, "baseline_bytes": torch.cuda.memory_allocated()}
    reset = _reset_peak_rss()
    return {"device": device, "baseline_bytes": _current_rss_bytes(), "peak_reset": reset}


def memory_peak(baseline: dict[str, Any]) -> dict[str, Any]:
    """Peak memory since `memory_baseline`: CPU peak RSS or torch.cuda.max_memory_allocated.

    Without a high-water-mark reset (non-Linux), the CPU peak may include the model build itself; the
    result says so in `peak_reset`.
    """
    if baseline["device"] == "cuda":
        synchronize("cuda")
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, method = _peak_rss_bytes()
    return {
        **baseline,
        "method": method,
        "peak_bytes": peak,
        "peak_above_baseline_mib": (peak - baseline["baseline_bytes"]) / 2**20,
    }


def emit_memory_result(result: dict[str, Any]) -> None:
    """Child side of `run_memory_case`: print the result as one marked JSON line."""
    print(MEMORY_RESULT_PREFIX + json.dumps(result), flush=True)


def run_memory_case(module: str, args: Sequence[str], timeout_s: float = 900) -> dict[str, Any]:
    """Run `python -m module *args` in a fresh interpreter and return the dict it emitted.

    A fresh process per case means no case inherits another's peak or allocator state.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMORY_RESULT_PREFIX):
            return json.loads(line[len(MEMORY_RESULT_PREFIX) :])
    raise RuntimeError(
        f"Memory case {list(args)} returned no result (exit code {proc.returncode}).\n"
        f"stderr tail:\n{proc.stderr[-3000:]}"
    )


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def results_path(name_or_path: str | Path, suffix: str) -> Path:
    """`benchmarks/results/<name><suffix>` for a bare name; a path with a folder or suffix is kept."""
    path = Path(name_or_path)
    if path.suffix or path.parent != Path("."):
        return path.with_suffix(suffix)
    return RESULTS_DIR / f"{path.name}{suffix}"


def write_json(name_or_path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as indented JSON; returns the path written."""
    path = results_path(name_or_path, ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def plot_panels(name_or_path: str | Path, panels: Sequence[dict[str, Any]], title: str = "") -> Path:
    """Draw side-by-side line plots to a PNG (Agg backend, no display needed).

    Each panel: {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, "logx": bool, "logy": bool,
    optional "styles": {label: matplotlib kwargs}}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        styles = panel.get("styles", {})
        for label, (xs, ys) in panel["series"].items():
            if xs:
                ax.plot(xs, ys, marker="o", label=label, **styles.get(label, {}))
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_title(panel["title"])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = results_path(name_or_path, ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (floats to 3 significant digits)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def wait_for_quiet_machine(
    max_load: float | None, max_minutes: float, poll_s: float = 30.0
) -> dict[str, Any]:
    """Poll the 1-minute load average until it is below `max_load` (or `max_minutes` pass); the record says
    how it went, so a run on a busy shared machine is marked as such. `max_load` None: no wait."""
    record: dict[str, Any] = {"max_load": max_load, "max_minutes": max_minutes, "waited_s": 0.0}
    start = time.time()
    while max_load is not None and os.getloadavg()[0] >= max_load and time.time() - start < 60 * max_minutes:
        time.sleep(poll_s)
    record["waited_s"] = time.time() - start
    record["load_average_at_start"] = list(os.getloadavg())
    record["quiet"] = max_load is None or record["load_average_at_start"][0] < max_load
    if max_load is not None:
        state = "below" if record["quiet"] else "still at or above"
        print(
            f"load average {record['load_average_at_start'][0]:.2f}: {state} {max_load} after "
            f"{record['waited_s'] / 60:.1f} min",
            flush=True,
        )
    return record

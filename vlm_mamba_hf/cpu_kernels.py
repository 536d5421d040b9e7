"""Fused CPU kernels, built once per machine from `csrc/` with the system C++ compiler and called via ctypes.

The PyTorch paths in `ops_ssd` and `ssm_ops` work everywhere but spend most of a small model's training step
in chains of small element-wise operations. The kernels here run the same recurrences in one pass with the
state kept in registers or cache: the Mamba-2 (SSD) scan, the Mamba-1 selective scan, the channels-last
causal conv + SiLU and the (gated) RMSNorm, each with its backward pass. They are plain C functions on raw
pointers: no torch headers, so they build in about a second, and any compiler/ABI problem leaves the
PyTorch path in place.

Building: on first use the source is compiled with `$CXX` (else `c++`, `g++` or `clang++`) into
`$VLM_MAMBA_KERNEL_CACHE` (default: `$XDG_CACHE_HOME/vlm_mamba_hf/kernels`, else `~/.cache/...`; the temp
folder when that is not writable), under a name that hashes the source, the compiler, the flags and the CPU
(model and feature flags), so an edited source or another CPU never loads a stale library. If no compiler is
found or no build loads, a warning says so once and the PyTorch path is used. `VLM_MAMBA_CPU_KERNELS=0` turns
the kernels off (no build is tried); `set_cpu_kernels_enabled` does the same from Python.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

_SOURCE = Path(__file__).with_name("csrc") / "mamba_cpu.cpp"
# The flags are tried in order; a compiler that rejects one set gets the next (e.g. no -march=native).
# -fopenmp: the kernels then run on the OpenMP pool torch already uses (libgomp, shared by name), so they
# scale with torch.get_num_threads() without competing with torch's own workers; without it they run serially.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native", "-fopenmp-simd"],
    ["-O3"],
)
_COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC"]
# States are stored every _CHECKPOINT_STEPS steps in the forward pass and recomputed in between by the
# backward pass: memory (b, h, l / K, p, n) against a (K + 1, p, n) buffer per thread.
_CHECKPOINT_STEPS = 32

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_failed: str | None = None
_enabled_override: bool | None = None


def set_cpu_kernels_enabled(enabled: bool | None) -> None:
    """Turn the fused CPU kernels off (False), on (True), or back to the environment's choice (None)."""
    global _enabled_override
    _enabled_override = None if enabled is None else bool(enabled)


def cpu_kernels_enabled() -> bool:
    """Whether CPU tensors may use the fused kernels (`VLM_MAMBA_CPU_KERNELS`, or `set_cpu_kernels_enabled`)."""
    if _enabled_override is not None:
        return _enabled_override
    return os.environ.get("VLM_MAMBA_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def kernel_cache_dir() -> Path:
    if os.environ.get("VLM_MAMBA_KERNEL_CACHE"):
        return Path(os.environ["VLM_MAMBA_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlm_mamba_hf" / "kernels"


def _compiler() -> str | None:
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """What -march=native compiles for: the machine type and, on Linux, the CPU's model and feature flags, so
    that a cache shared between machines (a network home directory) never hands one CPU another's build."""
    signature = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as info:
            lines = [
                line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))
            ]
        signature += sorted(set(lines))
    except OSError:
        pass
    return "\n".join(signature)


def _load_or_build(compiler: str, directory: Path) -> ctypes.CDLL:
    """The library built for this source, compiler and CPU in `directory`, compiled there first if missing."""
    source = _SOURCE.read_bytes()
    cpu = _cpu_signature().encode()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(flags + _COMMON_FLAGS).encode(), cpu])
        ).hexdigest()[:16]
        target = directory / f"mamba_cpu-{key}.so"
        if not target.exists():
            directory.mkdir(parents=True, exist_ok=True)
            # Built under a temporary name and renamed into place: a concurrent process never loads half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
            result = subprocess.run(
                [compiler, *flags, *_COMMON_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True
            )
            if result.returncode != 0:
                os.unlink(tmp)
                lines = result.stderr.strip().splitlines()
                first_error = next((line for line in lines if "error" in line), lines[-1] if lines else "")
                errors.append(f"{' '.join(flags)}: {first_error or f'exit status {result.returncode}'}")
                continue
            os.replace(tmp, target)
        try:
            return ctypes.CDLL(str(target))
        except OSError as error:  # e.g. an OpenMP runtime that links but does not load: try the next flags
            errors.append(f"{' '.join(flags)}: built but does not load ({error})")
    raise RuntimeError("no build of the source loads: " + "; ".join(errors))


_INT, _PTR, _DOUBLE = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
# Each entry point's argument types, before the thread count (int) that every one of them takes last.
_SIGNATURES = {
    "vlm_ssd_forward": [_INT] * 9 + [_PTR] * 10,
    "vlm_ssd_backward": [_INT] * 11 + [_PTR] * 16,
    "vlm_conv_forward": [_INT] * 5 + [_PTR] * 4 + [ctypes.c_int, _PTR],
    "vlm_conv_backward": [_INT] * 6 + [_PTR] * 4 + [ctypes.c_int] + [_PTR] * 5,
    "vlm_rmsnorm_forward": [_INT] * 3 + [_PTR, _INT, _PTR, _INT, _PTR, _DOUBLE, _PTR, _PTR],
    "vlm_rmsnorm_backward": [_INT] * 3 + [_PTR, _INT, _PTR, _INT] + [_PTR] * 5 + [_INT, _PTR],
    "vlm_s6_forward": [_INT] * 5 + [_PTR] * 9,
    "vlm_s6_backward": [_INT] * 5 + [_PTR] * 14,
}


def _declare(library: ctypes.CDLL) -> None:
    for name, argtypes in _SIGNATURES.items():
        for suffix in ("f32", "f64"):
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes = [*argtypes, ctypes.c_int]
            function.restype = ctypes.c_int


def load_library() -> ctypes.CDLL | None:
    """The built kernel library, building it on first call; None (after one warning) when it cannot be."""
    global _library, _load_failed
    if _library is not None or _load_failed is not None:
        return _library
    with _lock:
        if _library is not None or _load_failed is not None:
            return _library
        if not _SOURCE.exists():
            # A copy of the code without csrc/ (the model files next to a checkpoint, for trust_remote_code):
            # the kernels are simply not part of it.
            _load_failed = f"{_SOURCE} is not there"
            return None
        compiler = _compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
            try:
                library = _load_or_build(compiler, kernel_cache_dir())
            except OSError:
                # An unwritable cache (a read-only home, a path that is a file): build in the temp folder.
                temp = Path(tempfile.gettempdir()) / f"vlm_mamba_hf-kernels-{os.getuid()}"
                library = _load_or_build(compiler, temp)
            _declare(library)
        except Exception as error:  # noqa: BLE001 - any failure means the PyTorch path
            _load_failed = str(error)
            warnings.warn(
                f"The fused CPU scan kernel could not be built ({error}); using the slower PyTorch path. "
                "Set VLM_MAMBA_CPU_KERNELS=0 to skip the build.",
                stacklevel=3,
            )
            return None
        _library = library
        return library


def kernels_available_for(tensor: torch.Tensor) -> bool:
    """Whether work on `tensor` would run the fused CPU kernels: a CPU tensor, kernels enabled, not inside
    `torch.compile` (an opaque call would split its graph), and the library built (on first call)."""
    if tensor.device.type != "cpu" or not cpu_kernels_enabled() or torch.compiler.is_compiling():
        return False
    return load_library() is not None


def _reset_for_tests() -> None:
    global _library, _load_failed
    _library, _load_failed = None, None


def _call(name: str, *args) -> None:
    """Run the entry point `name` for the dtype of the first tensor in `args` (fp32 or fp64), passing tensors
    as pointers (None as NULL) and torch's thread count last."""
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
    suffix = "f64" if dtype == torch.float64 else "f32"
    pointers = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    getattr(load_library(), f"{name}_{suffix}")(*pointers, torch.get_num_threads())


def _checkpoints(x: torch.Tensor, b: int, h: int, length: int, p: int, n: int) -> torch.Tensor:
    """The buffer of states the forward scan stores every _CHECKPOINT_STEPS steps for the backward pass."""
    return x.new_empty(b, h, (length + _CHECKPOINT_STEPS - 1) // _CHECKPOINT_STEPS, p, n)


class _SSDScanCPUFn(torch.autograd.Function):
    """The fused scan with its hand-written backward. Inputs contiguous, fp32 or fp64, dt final. The skip
    D * x runs in the kernel for one D per head, (h,); a (h, p) D is applied here."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0):
        b, length, h, p = x.shape
        g, n = B.shape[2:]
        needs_grad = any(ctx.needs_input_grad)
        y = torch.empty_like(x)
        final = torch.empty_like(h0)
        checkpoints = _checkpoints(x, b, h, length, p, n) if needs_grad else None
        D_kernel = D if D is not None and D.dim() == 1 else None
        args = (b, length, h, p, g, n, _CHECKPOINT_STEPS, h * p, g * n, x, dt, A, B, C, D_kernel, h0)
        _call("vlm_ssd_forward", *args, y, final, checkpoints)
        if needs_grad:
            ctx.save_for_backward(x, dt, A, B, C, D, checkpoints)
        if D is not None and D_kernel is None:
            y.addcmul_(x, D)
        return y, final

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, dt, A, B, C, D, checkpoints = ctx.saved_tensors
        b, length, h, p = x.shape
        g, n = B.shape[2:]
        grad_y = None if grad_y is None else grad_y.to(x.dtype).contiguous()
        grad_final = None if grad_final is None else grad_final.to(x.dtype).contiguous()
        grad_x, grad_dt = torch.empty_like(x), torch.empty_like(dt)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A, grad_h0 = x.new_empty(b, h), x.new_empty(b, h, p, n)
        D_kernel = D if D is not None and D.dim() == 1 else None
        grad_D = None if D_kernel is None else x.new_empty(b, h)
        strides = (h * p, g * n, h * p, g * n)  # x, B and C, grad_x, grad_B and grad_C: contiguous
        args = (b, length, h, p, g, n, _CHECKPOINT_STEPS, *strides, x, dt, A, B, C, D_kernel)
        grads = (grad_x, grad_dt, grad_B, grad_C, grad_A, grad_D, grad_h0)
        _call("vlm_ssd_backward", *args, checkpoints, grad_y, grad_final, *grads)
        if D_kernel is not None:
            grad_D = grad_D.sum(0)
        elif D is not None and grad_y is not None:
            grad_x.addcmul_(grad_y, D)
            grad_D = (grad_y * x).sum((0, 1))
        elif D is not None:
            grad_D = torch.zeros_like(D)
        return grad_x, grad_dt, grad_A.sum(0), grad_B, grad_C, grad_D, grad_h0


def ssd_scan_cpu(x, dt, A, B, C, D, h0):
    """y (b, l, h, p) with the skip D * x, and the final state (b, h, p, n); every input already in the
    compute dtype (fp32 or fp64) with dt final. Differentiable."""
    args = [t.contiguous() for t in (x, dt, A, B, C)]
    return _SSDScanCPUFn.apply(*args, None if D is None else D.contiguous(), h0.contiguous())


class _CausalConvCPUFn(torch.autograd.Function):
    """Causal depthwise conv over rows (b, l, c) with left context (b, k - 1, c), plus SiLU when asked."""

    @staticmethod
    def forward(ctx, x, weight_kc, bias, left, silu):
        b, length, c = x.shape
        k = weight_kc.shape[0]
        out = torch.empty_like(x)
        _call("vlm_conv_forward", b, length, c, k, c, x, weight_kc, bias, left, int(silu), out)
        ctx.save_for_backward(x, weight_kc, bias, left)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_kc, bias, left = ctx.saved_tensors
        b, length, c = x.shape
        k = weight_kc.shape[0]
        grad_out = grad_out.to(x.dtype).contiguous()
        grad_x, grad_w, grad_left = torch.empty_like(x), torch.empty_like(weight_kc), torch.empty_like(left)
        grad_bias = None if bias is None else torch.empty_like(bias)
        _call(
            "vlm_conv_backward",
            b,
            length,
            c,
            k,
            c,
            c,
            x,
            weight_kc,
            bias,
            left,
            int(ctx.silu),
            grad_out,
            grad_x,
            grad_w,
            grad_bias,
            grad_left,
        )
        return grad_x, grad_w, grad_bias, grad_left, None


def conv_left_context(conv_state: torch.Tensor, k: int) -> torch.Tensor:
    """A conv cache (b, channels, >= k - 1), as the recurrent cache stores it, as the k - 1 rows of left
    context (b, k - 1, channels) that a causal conv over (b, l, channels) rows reads before its first step."""
    return conv_state[..., conv_state.shape[-1] - (k - 1) :].transpose(1, 2)


def causal_conv1d_rows_cpu(x, weight, bias, left, silu: bool):
    """x (b, l, c) fp32/fp64, weight (c, k), bias (c,) or None, left (b, k - 1, c) -> (b, l, c). Differentiable."""
    dtype = x.dtype
    weight_kc = weight.t().to(dtype).contiguous()
    bias = None if bias is None else bias.to(dtype).contiguous()
    return _CausalConvCPUFn.apply(x.contiguous(), weight_kc, bias, left.to(dtype).contiguous(), silu)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t (..., d) as rows the kernel can read: t itself with its row stride when its rows are evenly spaced
    with contiguous channels (a slice of a wider tensor's last dim is), else a contiguous copy."""
    if t.stride(-1) == 1 and all(t.stride(i) == t.shape[i + 1] * t.stride(i + 1) for i in range(t.dim() - 2)):
        return t, t.stride(-2) if t.dim() > 1 else t.shape[-1]
    return t.contiguous(), t.shape[-1]


class _RMSNormCPUFn(torch.autograd.Function):
    """RMSNorm per group of channels, optionally gated by SiLU(z) first; fp32 or fp64 throughout."""

    @staticmethod
    def forward(ctx, x, z, weight, group_size, eps):
        d = x.shape[-1]
        rows = x.numel() // d
        x_rows, x_stride = _rows(x)
        z_rows, z_stride = _rows(z) if z is not None else (None, 0)
        out = x.new_empty(x.shape)
        rstd = x.new_empty(rows, d // group_size)
        _call(
            "vlm_rmsnorm_forward",
            rows,
            d,
            group_size,
            x_rows,
            x_stride,
            z_rows,
            z_stride,
            weight,
            eps,
            out,
            rstd,
        )
        ctx.save_for_backward(x_rows, z_rows, weight, rstd)
        ctx.layout = (x.shape, rows, d, group_size, x_stride, z_stride)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_rows, z_rows, weight, rstd = ctx.saved_tensors
        shape, rows, d, group_size, x_stride, z_stride = ctx.layout
        grad_out = grad_out.to(weight.dtype).contiguous()
        grad_x = grad_out.new_empty(shape)
        grad_z = None if z_rows is None else grad_out.new_empty(shape)
        grad_w = torch.empty_like(weight)
        _call(
            "vlm_rmsnorm_backward",
            rows,
            d,
            group_size,
            x_rows,
            x_stride,
            z_rows,
            z_stride,
            weight,
            rstd,
            grad_out,
            grad_x,
            grad_z,
            d,
            grad_w,
        )
        return grad_x, grad_z, grad_w, None, None


def rms_norm_cpu(x, weight, eps: float, gate=None, group_size: int | None = None):
    """weight * RMSNorm(x * SiLU(gate)) per group of `group_size` channels (all of them by default); x, gate
    (..., d) and weight (d,) of one dtype, fp32 or fp64. Differentiable."""
    group_size = group_size or x.shape[-1]
    return _RMSNormCPUFn.apply(x, gate, weight.contiguous(), group_size, float(eps))


class _SelectiveScanCPUFn(torch.autograd.Function):
    """The Mamba-1 selective scan: u, delta (b, d, l) and B, C (b, l, n) contiguous, A (d, n), h0 (b, d, n)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        b, d, length = u.shape
        n = A.shape[1]
        K = _CHECKPOINT_STEPS
        needs_grad = any(ctx.needs_input_grad)
        y, final = torch.empty_like(u), torch.empty_like(h0)
        checkpoints = u.new_empty(b, d, (length + K - 1) // K, n) if needs_grad else None
        _call("vlm_s6_forward", b, d, length, n, K, u, delta, A, B, C, h0, y, final, checkpoints)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, checkpoints)
        return y, final

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        u, delta, A, B, C, checkpoints = ctx.saved_tensors
        b, d, length = u.shape
        n = A.shape[1]
        threads = torch.get_num_threads()
        workers = max(1, min(threads, b * d))
        grad_y = None if grad_y is None else grad_y.to(u.dtype).contiguous()
        grad_final = None if grad_final is None else grad_final.to(u.dtype).contiguous()
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_A, grad_h0 = u.new_empty(b, d, n), u.new_empty(b, d, n)
        grad_B, grad_C = u.new_empty(workers, b, length, n), u.new_empty(workers, b, length, n)
        _call(
            "vlm_s6_backward",
            b,
            d,
            length,
            n,
            _CHECKPOINT_STEPS,
            u,
            delta,
            A,
            B,
            C,
            checkpoints,
            grad_y,
            grad_final,
            grad_u,
            grad_delta,
            grad_A,
            grad_B,
            grad_C,
            grad_h0,
        )
        return grad_u, grad_delta, grad_A.sum(0), grad_B.sum(0), grad_C.sum(0), grad_h0


def selective_scan_cpu(u, delta, A, B, C, h0):
    """y (b, d, l) without the skip and gate, and the final state (b, d, n); u, delta (b, d, l), B, C
    (b, n, l), A (d, n), h0 (b, d, n), all in the compute dtype (fp32 or fp64) with delta final. Differentiable."""
    return _SelectiveScanCPUFn.apply(
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        h0.contiguous(),
    )


def _mixer_forward(zxbcdt, weight_kc, conv_bias, dt_bias, A, D, norm_weight, sizes, eps, **states):
    """The fused mixer's forward kernels. `states` may hold `left` (b, k - 1, conv_dim) conv context, `h0` and
    `final` (b, heads, head_dim, state) scan states, and `checkpoints` for a backward pass; None: not used."""
    d_inner, groups, state, head_dim, norm_group = sizes
    b, length, width = zxbcdt.shape
    k, conv_dim = weight_kc.shape
    heads = width - d_inner - conv_dim
    z, xbc, dt_raw = zxbcdt.split([d_inner, conv_dim, heads], dim=-1)
    conv_out = zxbcdt.new_empty(b, length, conv_dim)
    conv_args = (b, length, conv_dim, k, width, xbc, weight_kc, conv_bias, states.get("left"), 1, conv_out)
    _call("vlm_conv_forward", *conv_args)
    dt_pre = dt_raw + dt_bias
    dt = F.softplus(dt_pre)
    x, B, C = conv_out.split([d_inner, groups * state, groups * state], dim=-1)
    y = zxbcdt.new_empty(b, length, d_inner)
    dims = (b, length, heads, head_dim, groups, state, _CHECKPOINT_STEPS, conv_dim, conv_dim)
    scan_states = (states.get("h0"), y, states.get("final"), states.get("checkpoints"))
    _call("vlm_ssd_forward", *dims, x, dt, A, B, C, D, *scan_states)
    rows = b * length
    out = torch.empty_like(y)
    rstd = y.new_empty(rows, d_inner // norm_group)
    norm_args = (rows, d_inner, norm_group, y, d_inner, z, width, norm_weight, eps)
    _call("vlm_rmsnorm_forward", *norm_args, out, rstd)
    return out, (dt_pre, dt, conv_out, y, rstd)


class _Mamba2MixerCPUFn(torch.autograd.Function):
    """A Mamba-2 mixer from in_proj's output to out_proj's input, in the kernels and in one autograd node.

    It reads z, xBC and dt where in_proj wrote them (slices of one (b, l, d_inner + conv_dim + heads) tensor)
    and writes their gradients into one tensor of that shape: no split copies, no joined gradients, no
    contiguous copies of x, B and C for the scan, and the skip D * x inside the scan kernel.
    """

    @staticmethod
    def forward(ctx, zxbcdt, weight_kc, conv_bias, dt_bias, A, D, norm_weight, sizes, eps):
        b, length, width = zxbcdt.shape
        d_inner, _, state, head_dim, _ = sizes
        heads = d_inner // head_dim
        checkpoints = None
        if any(ctx.needs_input_grad):
            checkpoints = _checkpoints(zxbcdt, b, heads, length, head_dim, state)
        params = (zxbcdt, weight_kc, conv_bias, dt_bias, A, D, norm_weight)
        out, (dt_pre, dt, conv_out, y, rstd) = _mixer_forward(*params, sizes, eps, checkpoints=checkpoints)
        if checkpoints is not None:
            saved = (zxbcdt, weight_kc, conv_bias, dt_pre, dt, A, D, norm_weight, conv_out, y, checkpoints)
            ctx.save_for_backward(*saved, rstd)
            ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad_out):
        zxbcdt, weight_kc, conv_bias, dt_pre, dt, A, D, norm_weight, conv_out, y, checkpoints, rstd = (
            ctx.saved_tensors
        )
        d_inner, groups, state, head_dim, norm_group = ctx.sizes
        b, length, width = zxbcdt.shape
        k, conv_dim = weight_kc.shape
        heads = width - d_inner - conv_dim
        rows = b * length
        grad_out = grad_out.to(y.dtype).contiguous()
        grad = torch.empty_like(zxbcdt)  # every slice of it is written below
        grad_z, grad_xbc, grad_dt_raw = grad.split([d_inner, conv_dim, heads], dim=-1)
        z, xbc, _ = zxbcdt.split([d_inner, conv_dim, heads], dim=-1)

        grad_y, grad_norm_weight = torch.empty_like(y), torch.empty_like(norm_weight)
        norm_args = (rows, d_inner, norm_group, y, d_inner, z, width, norm_weight, rstd, grad_out)
        _call("vlm_rmsnorm_backward", *norm_args, grad_y, grad_z, width, grad_norm_weight)

        gn = groups * state
        x, B, C = conv_out.split([d_inner, gn, gn], dim=-1)
        grad_conv = torch.empty_like(conv_out)
        grad_x, grad_B, grad_C = grad_conv.split([d_inner, gn, gn], dim=-1)
        grad_dt, grad_A, grad_D = torch.empty_like(dt), y.new_empty(b, heads), y.new_empty(b, heads)
        strides = (conv_dim,) * 4  # x, B and C, and their gradients, inside (b, l, conv_dim) tensors
        dims = (b, length, heads, head_dim, groups, state, _CHECKPOINT_STEPS, *strides)
        grads = (grad_x, grad_dt, grad_B, grad_C, grad_A, grad_D, None)
        _call("vlm_ssd_backward", *dims, x, dt, A, B, C, D, checkpoints, grad_y, None, *grads)

        grad_w = torch.empty_like(weight_kc)
        grad_bias = None if conv_bias is None else torch.empty_like(conv_bias)
        conv_args = (b, length, conv_dim, k, width, width, xbc, weight_kc, conv_bias, None, 1, grad_conv)
        _call("vlm_conv_backward", *conv_args, grad_xbc, grad_w, grad_bias, None)

        grad_dt_pre = grad_dt * torch.sigmoid(dt_pre)  # softplus' = sigmoid
        grad_dt_raw.copy_(grad_dt_pre)
        grad_dt_bias = grad_dt_pre.sum((0, 1))
        grad_params = (grad_w, grad_bias, grad_dt_bias, grad_A.sum(0), grad_D.sum(0), grad_norm_weight)
        return grad, *grad_params, None, None


def mamba2_mixer_cpu(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    d_inner: int,
    groups: int,
    state: int,
    head_dim: int,
    norm_group: int,
    eps: float,
    conv_state: torch.Tensor | None = None,
    ssm_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """A Mamba-2 mixer without padding mask, from in_proj's output zxbcdt (b, l, d_inner + conv_dim + heads) =
    [z, xBC, dt] to the gated norm's output (b, l, d_inner): causal conv + SiLU over xBC (conv_weight
    (conv_dim, k)), dt = softplus(dt + dt_bias) with no clamp, the SSD scan with one A and D per head, and
    RMSNorm(y * SiLU(z)) per group of `norm_group` channels times norm_weight. Every tensor of one dtype, fp32
    or fp64; needs the kernels (`kernels_available_for`).

    Without states it is differentiable (training). A prefill into a cache passes the cache's conv_state
    (b, conv_dim, >= k - 1; its last k - 1 columns are the conv's left context) and ssm_state (b, heads,
    head_dim, state), either None for zeros, and return_final_state=True for (out, final SSM state); that
    path has no backward pass, so it runs only without gradients.
    """
    inputs = _mixer_inputs(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight)
    sizes = (d_inner, groups, state, head_dim, norm_group)
    if conv_state is None and ssm_state is None and not return_final_state:
        return _Mamba2MixerCPUFn.apply(*inputs, sizes, float(eps))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise RuntimeError(
            "mamba2_mixer_cpu with cache states or a final state has no backward pass; run the prefill under "
            "torch.no_grad(), or without states for training."
        )
    b, k, dtype = zxbcdt.shape[0], conv_weight.shape[1], zxbcdt.dtype
    left = None if conv_state is None else conv_left_context(conv_state, k).to(dtype).contiguous()
    h0 = None if ssm_state is None else ssm_state.to(dtype).contiguous()
    final = zxbcdt.new_empty(b, d_inner // head_dim, head_dim, state)
    out, _ = _mixer_forward(*inputs, sizes, float(eps), left=left, h0=h0, final=final)
    return (out, final) if return_final_state else out


def _mixer_inputs(zxbcdt, conv_weight, conv_bias, *params):
    """The fused mixer's tensors in zxbcdt's dtype and the kernels' layout (conv weight as (k, conv_dim))."""
    dtype = zxbcdt.dtype
    weight_kc = conv_weight.t().to(dtype).contiguous()
    bias = None if conv_bias is None else conv_bias.to(dtype).contiguous()
    return (zxbcdt.contiguous(), weight_kc, bias, *[t.to(dtype).contiguous() for t in params])

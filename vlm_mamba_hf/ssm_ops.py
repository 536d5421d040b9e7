"""State-space operations: selective scan, causal depthwise conv1d, and their one-step updates.

Pure functions, no modules. Each fast path has a plain reference beside it (`*_ref`) that tests use as
ground truth. Notation follows the Mamba paper (Gu & Dao, 2023, Algorithm 2):

    b: batch, d: channels (d_inner), l: sequence length, n: state size (d_state)
    deltaA_t = exp(delta_t * A)                 (b, d, n)   discretised A (zero-order hold)
    deltaBu_t = delta_t * u_t * B_t             (b, d, n)   discretised B times input (Euler)
    h_t = deltaA_t * h_{t-1} + deltaBu_t        (b, d, n)
    y_t = sum_n C_t * h_t + D * u_t             (b, d)

CUDA tensors go to the `mamba_ssm` / `causal_conv1d` kernels when they import; everything else (CPU
included) takes the PyTorch path, which never needs them.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .cpu_kernels import kernels_available_for, load_library, selective_scan_cpu

_KERNELS: dict[str, object] | None = None
_WARNED_MISSING_KERNELS = False

CUDA_EXTRA_HINT = 'pip install "vlm-mamba-hf[cuda]"'


def _load_kernels() -> dict[str, object]:
    """Import the optional CUDA kernels once; missing ones are simply absent from the dict."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    kernels: dict[str, object] = {}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        kernels["selective_scan_fn"] = selective_scan_fn
    except Exception:  # noqa: BLE001 - any import failure means "no kernel"
        pass
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

        kernels["mamba_inner_fn"] = mamba_inner_fn
    except Exception:  # noqa: BLE001
        pass
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        kernels["selective_state_update"] = selective_state_update
    except Exception:  # noqa: BLE001
        pass
    try:
        # Mamba-2 (SSD); the Mamba-2-shaped one-step update is the same `selective_state_update` as above.
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        kernels["mamba_chunk_scan_combined"] = mamba_chunk_scan_combined
    except Exception:  # noqa: BLE001
        pass
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update

        kernels["causal_conv1d_fn"] = causal_conv1d_fn
        kernels["causal_conv1d_update"] = causal_conv1d_update
    except Exception:  # noqa: BLE001
        pass
    _KERNELS = kernels
    return kernels


_USE_KERNELS = True


def set_kernels_enabled(enabled: bool) -> None:
    """Turn the CUDA kernels off (PyTorch path everywhere) or back on; for parity tests and debugging."""
    global _USE_KERNELS
    _USE_KERNELS = bool(enabled)


def _cuda_kernel(name: str, tensor: torch.Tensor):
    """The kernel `name` for a CUDA tensor, or None (CPU tensors never reach a kernel)."""
    global _WARNED_MISSING_KERNELS
    if not tensor.is_cuda or not _USE_KERNELS:
        return None
    kernel = _load_kernels().get(name)
    if kernel is None and not _WARNED_MISSING_KERNELS:
        _WARNED_MISSING_KERNELS = True
        warnings.warn(
            f"CUDA tensors but the Mamba kernel `{name}` is not installed: using the slower PyTorch path. "
            f"Install the kernels with `{CUDA_EXTRA_HINT}`.",
            stacklevel=3,
        )
    return kernel


def _cuda_step_kernel(name: str, tensor: torch.Tensor):
    """The kernel for a one-token decoding step, or None.

    Under `torch.compile` (transformers' compiled `generate`, CUDA graphs through inductor) the step stays
    in PyTorch: a handful of elementwise ops that inductor fuses, with no opaque call to split the graph.
    """
    if torch.compiler.is_compiling():
        return None
    return _cuda_kernel(name, tensor)


def kernel_available(name: str, device: torch.device) -> bool:
    """Whether tensors on `device` would run the kernel `name` (CUDA, kernels enabled and imported)."""
    return torch.device(device).type == "cuda" and _USE_KERNELS and name in _load_kernels()


def kernels_available() -> dict[str, bool]:
    """Which optional CUDA kernels imported (for diagnostics)."""
    kernels = _load_kernels()
    return {
        name: name in kernels
        for name in (
            "selective_scan_fn",
            "selective_state_update",
            "causal_conv1d_fn",
            "causal_conv1d_update",
            "mamba_inner_fn",
        )
    }


# ----------------------------------------------------------------------------------------------------------
# Selective scan (Mamba-1)
# ----------------------------------------------------------------------------------------------------------


def _prepare_delta(
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """delta (b, d, l) -> softplus(delta + delta_bias) in `dtype` (the bias and softplus only when given)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    if D is not None:
        y = y + u.float() * D.float()[..., None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Plain sequential selective scan, one time step per iteration: the ground truth.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,); initial_state: (b, d, n).
    Returns y (b, d, l) in u's dtype, and the final state (b, d, n) in fp32 when asked.
    """
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    u_f, A_f, B_f, C_f = u.float(), A.float(), B.float(), C.float()
    b, d, length = u.shape
    h = u_f.new_zeros(b, d, A.shape[1]) if initial_state is None else initial_state.float()
    ys = []
    for t in range(length):
        deltaA = torch.exp(delta[:, :, t, None] * A_f)
        deltaBu = (delta[:, :, t] * u_f[:, :, t])[:, :, None] * B_f[:, None, :, t]
        h = deltaA * h + deltaBu
        ys.append((h * C_f[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_f.new_zeros(b, d, 0)
    y = _finish(y, u, D, z, u.dtype)
    return (y, h) if return_final_state else y


_SEQUENTIAL_MIN_STATE = 1 << 14


def _linear_recurrence(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states of h_t = a_t * h_{t-1} + x_t over dim 0, from h_{-1} = h0.

    a, x: (t, *s) with 0 <= a <= 1 (a decay); h0: (*s). Returns h: (t, *s).

    When one step's state is large, a plain loop (one fused multiply-add per step) is memory-bound
    already. When it is small, Python overhead per step dominates, so a two-level scan runs instead: the
    time axis is cut into k chunks of c steps, a loop of c steps runs the recurrence inside all chunks at
    once from a zero state, a loop of k steps carries the true state across chunk boundaries, and each
    chunk adds (cumulative decay since its start) x (carried state). About 2*sqrt(t) Python steps
    instead of t. Products of decays stay in [0, 1], so both are as exact as the sequential reference
    even for very large steps (no exp(+x) anywhere).
    """
    t = a.shape[0]
    if t == 0:
        return x.clone()
    if a[0].numel() >= _SEQUENTIAL_MIN_STATE or t <= 4:
        h = torch.empty_like(x)
        torch.addcmul(x[0], a[0], h0, out=h[0])
        for i in range(1, t):
            torch.addcmul(x[i], a[i], h[i - 1], out=h[i])
        return h
    c = max(1, int(math.ceil(math.sqrt(t))))
    k = (t + c - 1) // c
    pad = k * c - t
    if pad:
        # Padding with a = 1, x = 0 leaves the state unchanged; the padded tail is dropped below.
        a = torch.cat([a, a.new_ones(pad, *a.shape[1:])])
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    a_chunks = a.view(k, c, *a.shape[1:])
    x_chunks = x.view(k, c, *x.shape[1:])
    h = torch.empty_like(x_chunks)
    decay = torch.empty_like(a_chunks)
    h[:, 0] = x_chunks[:, 0]
    decay[:, 0] = a_chunks[:, 0]
    for i in range(1, c):
        torch.addcmul(x_chunks[:, i], a_chunks[:, i], h[:, i - 1], out=h[:, i])
        torch.mul(a_chunks[:, i], decay[:, i - 1], out=decay[:, i])
    carry = torch.empty_like(h0.expand(k, *h0.shape))
    carry[0] = h0
    for j in range(1, k):
        torch.addcmul(h[j - 1, -1], decay[j - 1, -1], carry[j - 1], out=carry[j])
    for i in range(c):
        h[:, i].addcmul_(decay[:, i], carry)
    return h.view(k * c, *x.shape[1:])[:t]


def _block_size(d: int, n: int, b: int, length: int) -> int:
    """Time steps per block: short blocks keep large states cache-resident; small states get long blocks."""
    state = b * d * n
    if state >= _SEQUENTIAL_MIN_STATE:
        return min(length, 32)
    return max(16, min(length, (1 << 22) // state))


class _SelectiveScanFn(torch.autograd.Function):
    """Blocked two-level selective scan with a recomputing backward (memory O(block * b * d * n)).

    Works on time-major fp32 tensors: u, delta (l, b, d); B, C (l, b, n); A (d, n); h0 (b, d, n).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        length, b, d = u.shape
        n = A.shape[1]
        block = _block_size(d, n, b, length)
        y = u.new_empty(length, b, d)
        starts = []
        h = h0
        for s in range(0, length, block):
            e = min(s + block, length)
            starts.append(h)
            deltaA = torch.exp(torch.einsum("lbd,dn->lbdn", delta[s:e], A))
            deltaBu = torch.einsum("lbd,lbn->lbdn", delta[s:e] * u[s:e], B[s:e])
            states = _linear_recurrence(deltaA, deltaBu, h)
            y[s:e] = torch.matmul(states, C[s:e, :, :, None]).squeeze(-1)
            h = states[-1].clone()
        ctx.block = block
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts) if starts else h0[None])
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        u, delta, A, B, C, starts = ctx.saved_tensors
        block = ctx.block
        length, b, d = u.shape
        grad_u = torch.zeros_like(u)
        grad_delta = torch.zeros_like(delta)
        grad_A = torch.zeros_like(A)
        grad_B = torch.zeros_like(B)
        grad_C = torch.zeros_like(C)
        if grad_y is None:
            grad_y = torch.zeros_like(u)
        # g_next: dL/dh at the first step of the following block, times that step's deltaA.
        g_next = grad_h_last.clone() if grad_h_last is not None else starts.new_zeros(starts.shape[1:])
        block_starts = list(range(0, length, block))
        for i in reversed(range(len(block_starts))):
            s = block_starts[i]
            e = min(s + block, length)
            h_start = starts[i]
            deltaA = torch.exp(torch.einsum("lbd,dn->lbdn", delta[s:e], A))
            deltaBu = torch.einsum("lbd,lbn->lbdn", delta[s:e] * u[s:e], B[s:e])
            states = _linear_recurrence(deltaA, deltaBu, h_start)
            grad_C[s:e] = torch.einsum("lbdn,lbd->lbn", states, grad_y[s:e])
            # Reverse recurrence: g_t = C_t * gy_t + deltaA_{t+1} * g_{t+1}, run forward in flipped time.
            direct = torch.einsum("lbd,lbn->lbdn", grad_y[s:e], C[s:e])
            decay_next = torch.cat([deltaA[1:], deltaA.new_ones(1, *deltaA.shape[1:])])
            g = _linear_recurrence(decay_next.flip(0), direct.flip(0), g_next).flip(0)
            # g_next for the previous block carries this block's first deltaA.
            prev_states = torch.cat([h_start[None], states[:-1]])
            g_next = g[0] * deltaA[0]
            del states, direct, decay_next
            # d deltaBu: g -> u, delta, B.
            gB_u = torch.einsum("lbdn,lbn->lbd", g, B[s:e])
            grad_u[s:e] = gB_u * delta[s:e]
            grad_delta[s:e] = gB_u * u[s:e]
            grad_B[s:e] = torch.einsum("lbdn,lbd->lbn", g, delta[s:e] * u[s:e])
            # d deltaA: g * h_{t-1} * deltaA -> (delta * A).
            g_dA = g.mul_(prev_states).mul_(deltaA)
            grad_delta[s:e] += torch.einsum("lbdn,dn->lbd", g_dA, A)
            grad_A += torch.einsum("lbdn,lbd->dn", g_dA, delta[s:e])
        grad_h0 = g_next if ctx.needs_input_grad[5] else None
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_h0


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Fast, differentiable pure-PyTorch selective scan (same contract as `selective_scan_ref`)."""
    out_dtype = u.dtype
    b, d, length = u.shape
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    h0 = (
        u.new_zeros(b, d, A.shape[1], dtype=torch.float32) if initial_state is None else initial_state.float()
    )
    y, h_last = _SelectiveScanFn.apply(
        u.float().permute(2, 0, 1).contiguous(),
        delta.permute(2, 0, 1).contiguous(),
        A.float().contiguous(),
        B.float().permute(2, 0, 1).contiguous(),
        C.float().permute(2, 0, 1).contiguous(),
        h0.contiguous(),
    )
    y = _finish(y.permute(1, 2, 0), u, D, z, out_dtype)
    return (y, h_last) if return_final_state else y


def selective_scan_fused_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """The fused CPU kernel (`cpu_kernels`), differentiable; same contract as `selective_scan_ref` (fp32
    compute, fp64 for fp64 inputs). Raises when the kernel is not built."""
    if load_library() is None:
        raise RuntimeError("The fused CPU scan kernel is not available; use selective_scan_torch.")
    ctype = torch.promote_types(u.dtype, torch.float32)
    b, d, _ = u.shape
    delta = _prepare_delta(delta, delta_bias, delta_softplus, ctype)
    h0 = u.new_zeros(b, d, A.shape[1], dtype=ctype) if initial_state is None else initial_state.to(ctype)
    y, h_last = selective_scan_cpu(u.to(ctype), delta, A.to(ctype), B.to(ctype), C.to(ctype), h0)
    y = _finish(y, u, D, z, u.dtype)
    return (y, h_last) if return_final_state else y


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Selective scan, dispatched: `mamba_ssm`'s CUDA kernel for CUDA tensors when it imports, else PyTorch.

    Shapes as in `selective_scan_ref`. The kernel takes no initial state, so a scan that continues from a
    cached state always takes the PyTorch path.
    """
    kernel = _cuda_kernel("selective_scan_fn", u) if initial_state is None else None
    if kernel is not None:
        # u, delta and z only need a contiguous last dimension (the kernel takes their other strides), as
        # in_proj's x / z halves and the (b, d, l) delta projection have; B and C are small and copied.
        out = kernel(
            _last_dim_contiguous(u),
            _last_dim_contiguous(delta),
            A.float().contiguous(),
            B.contiguous(),
            C.contiguous(),
            D=None if D is None else D.float(),
            z=None if z is None else _last_dim_contiguous(z),
            delta_bias=None if delta_bias is None else delta_bias.float(),
            delta_softplus=delta_softplus,
            return_last_state=return_final_state,
        )
        if return_final_state:
            y, last = out
            return y, last.float()
        return out
    if kernels_available_for(u):
        return selective_scan_fused_cpu(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state
        )
    return selective_scan_torch(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state
    )


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One decoding step of the scan; updates `state` (b, d, n) in place and returns y (b, d).

    x, dt, z: (b, d); A: (d, n); B, C: (b, n); D, dt_bias: (d,).
    """
    kernel = _cuda_step_kernel("selective_state_update", x)
    if kernel is not None:
        return kernel(state, x, dt, A.float(), B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    deltaA = torch.exp(dt[..., None] * A.float())
    deltaBu = (dt * x.float())[..., None] * B.float()[:, None, :]
    new_state = deltaA * state.float() + deltaBu
    state.copy_(new_state)
    y = (new_state * C.float()[:, None, :]).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Causal depthwise conv1d
# ----------------------------------------------------------------------------------------------------------


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"Unsupported conv activation {activation!r}; use 'silu' or None.")


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise conv by explicit sums: out_t = sum_j w_j * x_{t-k+1+j}. x (b, d, l), weight (d, k)."""
    k = weight.shape[1]
    left = (
        x.new_zeros(x.shape[0], x.shape[1], k - 1)
        if initial_state is None
        else initial_state[..., -(k - 1) :]
    )
    if k == 1:
        left = x[..., :0]
    xp = torch.cat([left.to(x.dtype), x], dim=-1).float()
    out = sum(weight[:, j, None].float() * xp[..., j : j + x.shape[-1]] for j in range(k))
    if bias is not None:
        out = out + bias.float()[:, None]
    return _activate(out, activation).to(x.dtype)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise conv1d over (b, d, l) with weight (d, k); `initial_state` (b, d, >=k-1) is the left context."""
    k = weight.shape[1]
    if initial_state is None:
        kernel = _cuda_kernel("causal_conv1d_fn", x)
        if kernel is not None and k in (2, 3, 4):
            # The kernel reads (b, d, l) with l contiguous at any batch stride (in_proj's x half); anything else
            # is copied to that layout (its channel-last variant has stride conditions of its own).
            x = x if x.stride(2) == 1 else x.contiguous()
            return kernel(x, weight.contiguous(), bias, activation=activation)
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]]
        return _activate(out, activation)
    left = initial_state[..., initial_state.shape[-1] - (k - 1) :] if k > 1 else x[..., :0]
    xp = torch.cat([left.to(x.dtype), x], dim=-1)
    out = F.conv1d(xp, weight.unsqueeze(1), bias, groups=x.shape[1])
    return _activate(out, activation)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step: x (b, d); conv_state (b, d, k) holds the last k inputs and is rolled in place."""
    kernel = _cuda_step_kernel("causal_conv1d_update", x)
    if kernel is not None and conv_state.dtype == x.dtype:
        return kernel(x, conv_state, weight, bias, activation)
    window = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    out = (window.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return _activate(out, activation).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# The fused Mamba-1 inner path (conv -> x_proj -> dt_proj -> scan -> gate -> out_proj)
# ----------------------------------------------------------------------------------------------------------


def mamba_inner_ref(
    xz: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Mamba-1 mixer from in_proj's output to out_proj's, in PyTorch (mamba_ssm's `mamba_inner_fn` contract).

    xz: (b, 2*d, l), x then the gate z; conv_weight (d, 1, k); x_proj_weight (r + 2n, d);
    delta_proj_weight (d, r), applied without bias; delta_bias (d,) is added in fp32 before the softplus;
    A (d, n); D (d,); out_proj_weight (d_model, d). Returns (b, l, d_model). SiLU after the conv, always.
    """
    rank, n = delta_proj_weight.shape[1], A.shape[1]
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d(x, conv_weight.squeeze(1), conv_bias, activation="silu")
    dt, B, C = torch.split(F.linear(x.transpose(1, 2), x_proj_weight), [rank, n, n], dim=-1)
    delta = F.linear(dt, delta_proj_weight).transpose(1, 2)
    y = selective_scan(
        x,
        delta,
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=True,
    )
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def mamba_inner(
    xz: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused Mamba-1 inner path, dispatched: `mamba_ssm`'s `mamba_inner_fn` for CUDA tensors, else the reference.

    Shapes as in `mamba_inner_ref`. The kernel reads the weights directly (it recomputes the conv and delta
    in its backward), so callers must make sure no adapter wraps the modules these weights come from.
    """
    kernel = _cuda_kernel("mamba_inner_fn", xz)
    if kernel is not None:
        return kernel(
            xz.contiguous(),
            conv_weight,
            conv_bias,
            x_proj_weight,
            delta_proj_weight,
            out_proj_weight,
            out_proj_bias,
            A.float(),
            None,  # input-dependent B
            None,  # input-dependent C
            None if D is None else D.float(),
            delta_bias=None if delta_bias is None else delta_bias.float(),
            delta_softplus=True,
        )
    return mamba_inner_ref(
        xz,
        conv_weight,
        conv_bias,
        x_proj_weight,
        delta_proj_weight,
        out_proj_weight,
        out_proj_bias,
        A,
        D,
        delta_bias,
    )

"""Mamba-2 state-space duality (SSD): sequential reference, chunked PyTorch scan, one-step update.

Pure functions, no modules. Notation follows the Mamba-2 paper (Dao & Gu, 2024, "Transformers are SSMs"):

    b: batch, l: sequence length, h: heads, p: head_dim, g: groups (B and C are shared by h/g heads),
    n: state size
    a_t = dt_t * A                              (b, h)        A is a negative scalar per head
    h_t = exp(a_t) * h_{t-1} + dt_t * x_t B_t^T (b, h, p, n)  B_t of the head's group
    y_t = h_t C_t + D * x_t                     (b, h, p)

The chunked form (paper section 6) cuts the sequence into chunks of Q steps: inside a chunk the output is a
masked "attention" y = (L o C B^T) (dt x) with L[t, s] = exp(a_{s+1} + ... + a_t); across chunks one state per
chunk is carried by a short sequential loop. Every exponent is a sum of non-positive terms (no exp(+x)), and
the within-chunk sums are differences of fp64 cumulative sums, so the fp32 result stays as exact as the
sequential reference even for very large steps.

CUDA tensors go to `mamba_ssm`'s Triton kernels (`mamba_chunk_scan_combined`, `selective_state_update`) when
they import; everything else (CPU included) takes the PyTorch path, which never needs them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cpu_kernels import (
    causal_conv1d_rows_cpu,
    conv_left_context,
    kernels_available_for,
    load_library,
    ssd_scan_cpu,
)
from .ssm_ops import _activate, _cuda_kernel, _cuda_step_kernel, causal_conv1d

DEFAULT_DT_LIMIT = (0.0, float("inf"))


def _prepare_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """dt (..., h) -> clamp(softplus(dt + dt_bias)) in `dtype` (softplus and clamp only when asked)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_weight(D: torch.Tensor) -> torch.Tensor:
    """D (h,) or (h, p) -> broadcastable against (..., h, p)."""
    return D[:, None] if D.dim() == 1 else D


def _finish(
    y: torch.Tensor,
    x: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Add the skip D * x (D: (h,) or (h, p)) and gate by SiLU(z); y, x, z (..., h, p)."""
    if D is not None:
        y = y + x.to(y.dtype) * _skip_weight(D.to(y.dtype))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _check_shapes(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> None:
    b, length, h, _ = x.shape
    g = B.shape[2]
    if (
        dt.shape != (b, length, h)
        or A.shape != (h,)
        or B.shape != C.shape
        or B.shape[:2] != (b, length)
        or h % g
    ):
        raise ValueError(
            f"SSD shapes do not fit: x {tuple(x.shape)} (b, l, h, p), dt {tuple(dt.shape)} (b, l, h), "
            f"A {tuple(A.shape)} (h,), B {tuple(B.shape)} and C {tuple(C.shape)} (b, l, g, n) with g dividing h."
        )


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Plain sequential SSD scan, one time step per iteration: the ground truth.

    x, z: (b, l, h, p); dt: (b, l, h); A, dt_bias: (h,); B, C: (b, l, g, n); D: (h,) or (h, p);
    initial_state: (b, h, p, n). Computes in fp32 (fp64 for fp64 inputs). Returns y (b, l, h, p) in x's dtype,
    and the final state (b, h, p, n) in the compute dtype when asked.
    """
    _check_shapes(x, dt, A, B, C)
    ctype = torch.promote_types(x.dtype, torch.float32)
    b, length, h, p = x.shape
    r = h // B.shape[2]
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, ctype)
    x_c, A_c = x.to(ctype), A.to(ctype)
    B_c = B.to(ctype).repeat_interleave(r, dim=2)
    C_c = C.to(ctype).repeat_interleave(r, dim=2)
    state = x_c.new_zeros(b, h, p, B.shape[3]) if initial_state is None else initial_state.to(ctype)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A_c)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x_c[:, t])[..., None] * B_c[:, t, :, None, :]
        ys.append((state * C_c[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x_c.new_zeros(b, 0, h, p)
    y = _finish(y, x, D, z, x.dtype)
    return (y, state) if return_final_state else y


# Decays below exp(-40) (4e-18, far under fp32 resolution) are held there: exp(-100) would be a denormal float,
# which is tens of times slower to compute with on CPUs, and the difference is invisible in the result.
_MIN_LOG_DECAY = -40.0
# The PyTorch path's chunk length is capped: the work inside a chunk grows with its length while the work per
# chunk boundary does not, and on CPUs 64 balances the two (the result does not depend on the chunk length).
_TORCH_MAX_CHUNK = 64
# (q x q) decay entries computed at once: few enough operations that Python overhead stays small, few enough
# entries that the temporaries stay a few tens of MB.
_BLOCK_ELEMENTS = 1 << 22


class _Chunks:
    """The chunked, group-major layout of one SSD call (fp32 inputs; dt already final).

    X = dt * x: (c, b, g, r, q, p); B, C: (c, b, g, q, n); cs: (c, b, g, r, q), the within-chunk cumulative
    log-decay in fp64, so that differences of large sums stay exact. r = h / g heads share a group's B and C.
    """

    def __init__(self, x, dt, A, B, C, chunk: int):
        self.b, self.length, self.h, self.p = x.shape
        self.g, self.n = B.shape[2:]
        self.r = self.h // self.g
        self.q = min(chunk, self.length)
        self.pad = (-self.length) % self.q
        self.c = (self.length + self.pad) // self.q
        dt_chunks = self.to_chunks(dt[..., None])
        self.X = torch.mul(
            self.to_chunks(x, copy=False), dt_chunks, out=x.new_empty(dt_chunks.shape[:-1] + (self.p,))
        )
        self.B, self.C = self.to_group_chunks(B), self.to_group_chunks(C)
        self.cs = dt_chunks[..., 0].double().mul_(A.double().view(self.g, self.r, 1)).cumsum(-1)
        self.causal = torch.ones(self.q, self.q, dtype=torch.bool, device=x.device).tril_()
        self.block = max(1, _BLOCK_ELEMENTS // (self.b * self.h * self.q * self.q))

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        # Zeros on the padded tail (dt = 0 there): no decay and no input, so the final state is unchanged.
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, self.pad)) if self.pad else t

    def to_chunks(self, t: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """(b, l, h, k) -> (c, b, g, r, q, k), contiguous (or the permuted view when `copy` is False)."""
        t = self._pad(t).view(self.b, self.c, self.q, self.g, self.r, -1).permute(1, 0, 3, 4, 2, 5)
        return t.contiguous() if copy else t

    def from_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """(c, b, g, r, q, k) -> (b, l, h, k)."""
        t = t.permute(1, 0, 4, 2, 3, 5).reshape(self.b, self.c * self.q, self.h, -1)
        return t[:, : self.length]

    def to_group_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """(b, l, g, n) -> (c, b, g, q, n), contiguous."""
        t = self._pad(t).view(self.b, self.c, self.q, self.g, self.n)
        return t.permute(1, 0, 3, 2, 4).contiguous()

    def from_group_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """(c, b, g, q, n) -> (b, l, g, n)."""
        return t.permute(1, 0, 3, 2, 4).reshape(self.b, self.c * self.q, self.g, self.n)[:, : self.length]

    def blocks(self):
        return [slice(i, min(i + self.block, self.c)) for i in range(0, self.c, self.block)]

    def decays(self, blk: slice):
        """For the chunks in `blk`: the masked decay matrix L[t, s] = exp(cs_t - cs_s) (s <= t), exp(cs_t)
        (decay since the chunk start), exp(cs_last - cs_t) (decay to the chunk end), exp(cs_last)."""
        cs = self.cs[blk]
        # The q x q differences are taken in fp32 of values centred on the chunk's middle step: the fp64 sums
        # keep the centring exact, and centring halves the magnitudes whose rounding the fp32 differences
        # inherit (a half-chunk of log-decay, far below the 1e-5 tolerance where the decay is not negligible),
        # at a quarter of the memory traffic of fp64 differences.
        rel = (cs - cs[..., self.q // 2 : self.q // 2 + 1]).float()
        decay = torch.sub(rel[..., :, None], rel[..., None, :]).clamp_(min=_MIN_LOG_DECAY)
        decay = decay.masked_fill_(~self.causal, float("-inf")).exp_()
        last = cs[..., -1:]
        to_end = (last - cs).float().clamp_(min=_MIN_LOG_DECAY).exp_()
        cs = cs.float().clamp_(min=_MIN_LOG_DECAY)
        return decay, cs.exp(), to_end, cs[..., -1].exp()

    def flat_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(k, b, g, r, q, p) -> (k, b, g, q, r*p): the heads of a group side by side, for one matmul per group."""
        return t.transpose(3, 4).reshape(*t.shape[:3], self.q, self.r * self.p)

    def unflat_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(k, b, g, q, r*p) -> (k, b, g, r, q, p) (a view)."""
        return t.view(*t.shape[:3], self.q, self.r, self.p).transpose(3, 4)


class _SSDChunkedFn(torch.autograd.Function):
    """Chunked SSD scan plus the skip D * x, with a hand-written backward that recomputes each block's decays.

    Works a block of chunks at a time so that the (q x q) temporaries stay bounded, and saves only the inputs and
    the state entering each chunk (c, b, g, r, p, n) for the backward pass.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, chunk):
        k = _Chunks(x, dt, A, B, C, chunk)
        y = x.new_empty(k.c, k.b, k.g, k.r, k.q, k.p)
        starts = x.new_empty(k.c, k.b, k.g, k.r, k.p, k.n)
        state = h0.reshape(k.b, k.g, k.r, k.p, k.n)
        for blk in k.blocks():
            X, Bc, Cc = k.X[blk], k.B[blk], k.C[blk]
            decay, from_start, to_end, chunk_decay = k.decays(blk)
            # 1. Inside chunks: y_t = sum_{s <= t} exp(cs_t - cs_s) (C_t . B_s) X_s.
            scores = torch.matmul(Cc, Bc.transpose(-1, -2))  # (k, b, g, q, q)
            y_blk = torch.matmul(decay.mul_(scores[:, :, :, None]), X)
            # 2. Each chunk's own state at its end, from zero: sum_s exp(cs_last - cs_s) X_s B_s^T.
            own = torch.matmul(k.flat_heads(X * to_end[..., None]).transpose(-1, -2), Bc)
            own = own.view(*own.shape[:3], k.r, k.p, k.n)
            # 3. Carry the state across the chunk boundaries.
            for i in range(own.shape[0]):
                starts[blk.start + i] = state
                state = torch.addcmul(own[i], chunk_decay[i][..., None, None], state)
            # 4. The entering state's contribution: y_t += exp(cs_t) C_t . state_in.
            carried = torch.matmul(Cc, starts[blk].reshape(*own.shape[:3], k.r * k.p, k.n).transpose(-1, -2))
            y[blk] = y_blk.addcmul_(k.unflat_heads(carried), from_start[..., None])
        ctx.save_for_backward(x, dt, A, B, C, D, starts)
        ctx.chunk = chunk
        y = k.from_chunks(y)
        if D is not None:
            y = y.addcmul_(x, _skip_weight(D))
        return y, state.reshape(k.b, k.h, k.p, k.n)

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, dt, A, B, C, D, starts = ctx.saved_tensors
        k = _Chunks(x, dt, A, B, C, ctx.chunk)
        grad_y = grad_y.float() if grad_y is not None else torch.zeros_like(x)
        grad_y_chunks = k.to_chunks(grad_y)
        grad_X, grad_cs = torch.empty_like(k.X), k.cs.new_empty(k.cs.shape, dtype=torch.float32)
        grad_B, grad_C = torch.empty_like(k.B), torch.empty_like(k.C)
        # g_state: dL/d(state after the current chunk), walked backwards through the chunks.
        g_state = (
            grad_final.float().reshape(k.b, k.g, k.r, k.p, k.n).clone()
            if grad_final is not None
            else x.new_zeros(k.b, k.g, k.r, k.p, k.n)
        )
        for blk in reversed(k.blocks()):
            X, Bc, Cc, dY, H = k.X[blk], k.B[blk], k.C[blk], grad_y_chunks[blk], starts[blk]
            nb = X.shape[0]
            decay, from_start, to_end, chunk_decay = k.decays(blk)
            # 4. y_t += exp(cs_t) C_t . state_in, per head: P = (exp(cs) dY) state_in (q, n).
            dY_carried = dY * from_start[..., None]
            P = torch.matmul(dY_carried, H)  # (nb, b, g, r, q, n)
            dC = P.sum(3)
            d_cs = (P.mul_(Cc[:, :, :, None])).sum(-1)
            d_state_in = torch.matmul(k.flat_heads(dY_carried).transpose(-1, -2), Cc)
            d_state_in = d_state_in.view(nb, k.b, k.g, k.r, k.p, k.n)
            # 3. state_after_i = exp(cs_last_i) state_in_i + own_i
            d_own = torch.empty_like(H)
            for i in reversed(range(nb)):
                d_own[i] = g_state
                g_state = torch.addcmul(d_state_in[i], chunk_decay[i][..., None, None], g_state)
            d_cs[..., -1] += (d_own * H).sum((-1, -2)).mul_(chunk_decay)
            # 2. own = sum_s exp(cs_last - cs_s) X_s B_s^T
            d_own_flat = d_own.view(nb, k.b, k.g, k.r * k.p, k.n)
            dX_weighted = k.unflat_heads(torch.matmul(Bc, d_own_flat.transpose(-1, -2)))
            dX = dX_weighted * to_end[..., None]
            d_to_end = (dX_weighted * X).sum(-1).mul_(to_end)
            d_cs -= d_to_end
            d_cs[..., -1] += d_to_end.sum(-1)
            dB = torch.matmul(k.flat_heads(X * to_end[..., None]), d_own_flat)
            # 1. y_t = sum_s L[t, s] (C_t . B_s) X_s
            scores = torch.matmul(Cc, Bc.transpose(-1, -2))
            M = decay * scores[:, :, :, None]
            dX += torch.matmul(M.transpose(-1, -2), dY)
            dM = torch.matmul(dY, X.transpose(-1, -2))
            d_scores = (dM * decay).sum(3)
            dC += torch.matmul(d_scores, Bc)
            dB += torch.matmul(d_scores.transpose(-1, -2), Cc)
            dM.mul_(M)  # dL/d(cs_t - cs_s) on the causal triangle (zero above it)
            d_cs += dM.sum(-1) - dM.sum(-2)
            grad_X[blk], grad_B[blk], grad_C[blk], grad_cs[blk] = dX, dB, dC, d_cs
        # cs = cumsum(dt * A) within each chunk; X = dt * x; y += D * x.
        grad_a = k.from_chunks(grad_cs.double().flip(-1).cumsum(-1).flip(-1).float()[..., None])[..., 0]
        grad_X = k.from_chunks(grad_X)
        grad_x = grad_X * dt[..., None]
        grad_D = None
        if D is not None:
            grad_x.addcmul_(grad_y, _skip_weight(D))
            grad_D = (grad_y * x).sum((0, 1))
            grad_D = grad_D.sum(-1) if D.dim() == 1 else grad_D
        grad_dt = (grad_X * x).sum(-1) + grad_a * A
        grad_A = (grad_a * dt).sum((0, 1))
        grad_h0 = g_state.reshape(k.b, k.h, k.p, k.n)
        grad_B, grad_C = k.from_group_chunks(grad_B), k.from_group_chunks(grad_C)
        return grad_x, grad_dt, grad_A, grad_B, grad_C, grad_D, grad_h0, None


def _torch_chunk(chunk_size: int, head_dim: int, state_size: int) -> int:
    """Chunk length for the PyTorch path: the result does not depend on it, the speed does.

    Work inside chunks grows with the chunk length, the state carried between chunks (head_dim x state_size
    per head) with their number; the two balance near sqrt(head_dim * state_size). Measured on CPU (fwd+bwd):
    head_dim 32 / state 16 is fastest at 16-32 (1.5x faster than 64), head_dim 64 / state 128 at 64.
    """
    balanced = 2 ** round(math.log2(math.sqrt(head_dim * state_size)))
    return max(1, min(chunk_size, _TORCH_MAX_CHUNK, balanced))


def _scan_setup(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, ctype=torch.float32):
    """Shared checks and casts of the fused scans: (dt final in `ctype`, D in `ctype` or None, h0 (b, h, p, n))."""
    _check_shapes(x, dt, A, B, C)
    b, _, h, p = x.shape
    h0 = x.new_zeros(b, h, p, B.shape[3], dtype=ctype) if initial_state is None else initial_state.to(ctype)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, ctype)
    return dt, None if D is None else D.to(ctype), h0


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Fast, differentiable pure-PyTorch SSD; same contract as `ssd_scan_ref`. The final state is fp32, y is
    in x's dtype. Chunks are `chunk_size` steps, at most 64 (`_TORCH_MAX_CHUNK`): the result does not depend on
    the chunk length, and on CPUs shorter chunks are faster.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    dt, D, h0 = _scan_setup(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state)
    if x.shape[1] == 0:
        y = x.new_zeros(x.shape)
        return (y, h0) if return_final_state else y
    chunk = min(chunk_size, _TORCH_MAX_CHUNK)
    y, final = _SSDChunkedFn.apply(x.float(), dt, A.float(), B.float(), C.float(), D, h0, chunk)
    y = _finish(y, x, None, z, x.dtype)
    return (y, final) if return_final_state else y


def ssd_fused_cpu(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """The fused CPU kernel (`cpu_kernels`), differentiable; same contract as `ssd_scan_ref` (fp32 compute, fp64
    for fp64 inputs; the final state in the compute dtype). Raises when the kernel is not built."""
    ctype = torch.promote_types(x.dtype, torch.float32)
    dt, D, h0 = _scan_setup(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, initial_state, ctype)
    if x.shape[1] == 0:
        y = x.new_zeros(x.shape)
        return (y, h0) if return_final_state else y
    if load_library() is None:
        raise RuntimeError("The fused CPU scan kernel is not available; use ssd_chunked.")
    y, final = ssd_scan_cpu(x.to(ctype), dt, A.to(ctype), B.to(ctype), C.to(ctype), D, h0)
    y = _finish(y, x, None, z, x.dtype)
    return (y, final) if return_final_state else y


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """SSD scan, dispatched: `mamba_ssm`'s Triton `mamba_chunk_scan_combined` for CUDA tensors when it imports,
    else, for CPU tensors, the fused kernel of `cpu_kernels` when it builds (`ssd_fused_cpu`), else `ssd_chunked`
    with the chunk length that is fastest for the head and state sizes (`_torch_chunk`; the result does not
    depend on it). Shapes as in `ssd_scan_ref`; the final state (b, h, p, n) is fp32 (fp64 for fp64 inputs on
    the fused CPU path).
    """
    kernel = _cuda_kernel("mamba_chunk_scan_combined", x)
    if kernel is not None:
        out = kernel(
            x.contiguous(),
            dt.contiguous(),
            A.float(),
            B.contiguous(),
            C.contiguous(),
            chunk_size,
            D=None if D is None else D.float(),
            z=None if z is None else z.contiguous(),
            dt_bias=None if dt_bias is None else dt_bias.float(),
            initial_states=None if initial_state is None else initial_state.float(),
            dt_softplus=dt_softplus,
            dt_limit=tuple(dt_limit),
            return_final_states=return_final_state,
        )
        if return_final_state:
            y, final = out
            return y, final.float()
        return out
    if kernels_available_for(x):
        return ssd_fused_cpu(
            x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state, return_final_state
        )
    chunk = _torch_chunk(chunk_size, x.shape[3], B.shape[3])
    return ssd_chunked(
        x, dt, A, B, C, chunk, D, z, dt_bias, dt_softplus, dt_limit, initial_state, return_final_state
    )


def ssd_state_update(
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
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
) -> torch.Tensor:
    """One decoding step; updates `state` (b, h, p, n) in place and returns y (b, h, p) in x's dtype.

    x, z: (b, h, p); dt: (b, h); A, dt_bias: (h,); B, C: (b, g, n); D: (h,) or (h, p).
    """
    b, h, p = x.shape
    g, n = B.shape[1:]
    kernel = _cuda_step_kernel("selective_state_update", x)
    if kernel is not None:
        if tuple(dt_limit) != DEFAULT_DT_LIMIT:
            # The kernel has no clamp: hand it the final step size.
            dt, dt_bias, dt_softplus = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit), None, False
        # Per-(head, head_dim) views with stride 0 over head_dim, as mamba_ssm's Mamba2.step passes them.
        return kernel(
            state,
            x,
            dt[..., None].expand(b, h, p),
            A.float()[:, None, None].expand(h, p, n),
            B,
            C,
            D=None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D),
            z=z,
            dt_bias=None if dt_bias is None else dt_bias[:, None].expand(h, p),
            dt_softplus=dt_softplus,
        )
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, h)
    r = h // g
    B_h = B.float().repeat_interleave(r, dim=1)  # (b, h, n)
    C_h = C.float().repeat_interleave(r, dim=1)
    decay = torch.exp(dt * A.float())[..., None, None]
    new_state = decay * state.float() + (dt[..., None] * x.float())[..., None] * B_h[:, :, None, :]
    state.copy_(new_state)
    y = torch.matmul(new_state, C_h[..., None]).squeeze(-1)
    return _finish(y, x, D, z, x.dtype)


class _CausalConv1dRowsFn(torch.autograd.Function):
    """Causal depthwise conv over rows of a (b, l, c) tensor: out_t = bias + sum_j w_j * x_{t-k+1+j}.

    Each tap is one fused multiply-add over contiguous rows, with no transposes (unlike `F.conv1d` on (b, c, l))
    and no padded copy of x: the k - 1 rows of left context only touch the first k - 1 outputs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left):
        k, length = weight.shape[1], x.shape[1]
        w = weight.t().to(x.dtype)  # (k, c)
        left = left.to(x.dtype)
        out = x * w[k - 1]
        for j in range(k - 1):
            shift = k - 1 - j  # tap j reads x_{t - shift}, or left[t + j] while t < shift
            if shift < length:
                out[:, shift:].addcmul_(x[:, : length - shift], w[j])
            head = min(shift, length)
            out[:, :head].addcmul_(left[:, j : j + head], w[j])
        if bias is not None:
            out += bias.to(x.dtype)
        ctx.save_for_backward(x, left, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, left, weight = ctx.saved_tensors
        k, length = weight.shape[1], grad_out.shape[1]
        w = weight.t().to(grad_out.dtype)
        grad_x = grad_out * w[k - 1]
        grad_left = torch.zeros_like(left)
        grad_w = weight.new_empty(weight.shape)
        grad_w[:, k - 1] = (grad_out * x).sum((0, 1))
        for j in range(k - 1):
            shift = k - 1 - j
            head = min(shift, length)
            tap = (grad_out[:, :head] * left[:, j : j + head]).sum((0, 1))
            if shift < length:
                grad_x[:, : length - shift].addcmul_(grad_out[:, shift:], w[j])
                tap += (grad_out[:, shift:] * x[:, : length - shift]).sum((0, 1))
            grad_left[:, j : j + head].addcmul_(grad_out[:, :head], w[j])
            grad_w[:, j] = tap
        grad_bias = grad_out.sum((0, 1)) if ctx.has_bias else None
        return grad_x, grad_w, grad_bias, grad_left


def causal_conv1d_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise conv1d over x (b, l, c) (channels last) with weight (c, k); returns (b, l, c).

    `initial_state` (b, c, >= k-1), as the recurrent cache stores it, is the left context. Same result as
    `ssm_ops.causal_conv1d` on x.transpose(1, 2); CUDA tensors go through it (and its kernel).
    """
    if x.is_cuda:
        return causal_conv1d(x.transpose(1, 2), weight, bias, initial_state, activation).transpose(1, 2)
    b, _, c = x.shape
    k = weight.shape[1]
    if initial_state is None:
        left = x.new_zeros(b, k - 1, c)
    else:
        left = conv_left_context(initial_state, k)
    fused_activation = activation in (None, "silu", "swish")
    if fused_activation and x.dtype in (torch.float32, torch.float64) and kernels_available_for(x):
        return causal_conv1d_rows_cpu(x, weight, bias, left, activation is not None)
    return _activate(_CausalConv1dRowsFn.apply(x, weight, bias, left), activation)

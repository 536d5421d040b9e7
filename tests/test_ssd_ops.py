"""The chunked Mamba-2 (SSD) scan and its one-step update against the plain sequential reference; dispatch."""

import pytest
import torch

from vlm_mamba_hf import cpu_kernels, ops_ssd, ssm_ops
from vlm_mamba_hf.ops_ssd import causal_conv1d_rows, ssd_chunked, ssd_scan, ssd_scan_ref, ssd_state_update
from vlm_mamba_hf.ssm_ops import causal_conv1d_ref

FP32_REL_TOL = 1e-5  # forward, fp32
FP32_GRAD_REL_TOL = 1e-4  # gradients, fp32


def _ssd_inputs(b, length, h, p, g, n, dt_shift=0.0, dt_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, length, h, p, generator=gen),
        dt=torch.randn(b, length, h, generator=gen) * dt_scale + dt_shift,
        A=-torch.exp(torch.randn(h, generator=gen)),
        B=torch.randn(b, length, g, n, generator=gen),
        C=torch.randn(b, length, g, n, generator=gen),
        D=torch.randn(h, generator=gen),
        z=torch.randn(b, length, h, p, generator=gen),
        dt_bias=torch.randn(h, generator=gen) * 0.5,
        initial_state=torch.randn(b, h, p, n, generator=gen),
    )


def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((ref - other).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize(
    "b,length,h,p,g,n,chunk,dt_shift",
    [
        (2, 1, 4, 3, 2, 5, 4, 0.0),
        (2, 7, 4, 3, 2, 5, 4, 0.0),  # length not a multiple of the chunk
        (2, 64, 6, 4, 3, 8, 16, 0.0),
        (3, 257, 4, 8, 1, 16, 64, 0.0),  # one group shared by all heads
        (2, 257, 4, 8, 4, 16, 64, 10.0),  # pre-softplus dt around +10: very large steps
        (1, 300, 2, 4, 2, 8, 512, -3.0),  # one chunk longer than the sequence; small steps
        (1, 2048, 2, 2, 1, 4, 32, 2.0),  # many chunks
    ],
)
def test_chunked_ssd_matches_sequential_reference(b, length, h, p, g, n, chunk, dt_shift):
    inputs = _ssd_inputs(b, length, h, p, g, n, dt_shift=dt_shift, dt_scale=3.0)
    y_ref, h_ref = ssd_scan_ref(**inputs, dt_softplus=True, return_final_state=True)
    y, h_last = ssd_chunked(**inputs, chunk_size=chunk, dt_softplus=True, return_final_state=True)
    assert torch.isfinite(y).all() and y.dtype == torch.float32 and h_last.dtype == torch.float32
    assert _rel_err(y_ref, y) <= FP32_REL_TOL
    assert _rel_err(h_ref, h_last) <= FP32_REL_TOL


def test_chunked_ssd_matches_fp64_reference():
    inputs = _ssd_inputs(2, 200, 4, 4, 2, 8, dt_shift=1.0, dt_scale=3.0)
    y_ref, h_ref = ssd_scan_ref(
        **{k: v.double() for k, v in inputs.items()}, dt_softplus=True, return_final_state=True
    )
    y, h_last = ssd_chunked(**inputs, chunk_size=32, dt_softplus=True, return_final_state=True)
    assert _rel_err(y_ref, y.double()) <= FP32_REL_TOL
    assert _rel_err(h_ref, h_last.double()) <= FP32_REL_TOL


def test_chunked_ssd_without_extras_matches_reference():
    inputs = _ssd_inputs(2, 50, 4, 3, 1, 5)
    for key in ("D", "z", "dt_bias", "initial_state"):
        inputs.pop(key)
    inputs["dt"] = torch.nn.functional.softplus(inputs["dt"])
    assert _rel_err(ssd_scan_ref(**inputs), ssd_chunked(**inputs, chunk_size=8)) <= FP32_REL_TOL


def test_per_channel_skip_and_dt_limit_match_reference():
    inputs = _ssd_inputs(2, 40, 4, 3, 2, 5, dt_scale=3.0)
    inputs["D"] = torch.randn(4, 3)
    kwargs = dict(dt_softplus=True, dt_limit=(0.01, 0.5), return_final_state=True)
    y_ref, h_ref = ssd_scan_ref(**inputs, **kwargs)
    y, h_last = ssd_chunked(**inputs, chunk_size=16, **kwargs)
    assert _rel_err(y_ref, y) <= FP32_REL_TOL and _rel_err(h_ref, h_last) <= FP32_REL_TOL


def test_chunk_size_does_not_change_the_result():
    inputs = _ssd_inputs(1, 100, 4, 3, 2, 5, dt_scale=2.0)
    outs = [ssd_chunked(**inputs, chunk_size=q, dt_softplus=True) for q in (1, 7, 32, 100, 256)]
    for out in outs[1:]:
        assert _rel_err(outs[0], out) <= FP32_REL_TOL


@pytest.mark.parametrize(
    "b,length,h,p,g,n,chunk,dt_shift",
    [(2, 9, 4, 3, 2, 5, 4, 10.0), (2, 70, 4, 3, 1, 5, 16, 0.0), (1, 130, 6, 4, 3, 8, 32, 2.0)],
)
def test_chunked_ssd_gradients_match_reference(b, length, h, p, g, n, chunk, dt_shift):
    inputs = _ssd_inputs(b, length, h, p, g, n, dt_shift=dt_shift, dt_scale=2.0)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(1)
    grad_y = torch.randn(b, length, h, p, generator=gen)
    grad_h = torch.randn(b, h, p, n, generator=gen)

    def grads(fn, **kwargs):
        y, h_last = fn(**leaves, dt_softplus=True, return_final_state=True, **kwargs)
        return torch.autograd.grad((y * grad_y).sum() + (h_last * grad_h).sum(), list(leaves.values()))

    for name, g_ref, g_fast in zip(leaves, grads(ssd_scan_ref), grads(ssd_chunked, chunk_size=chunk)):
        assert _rel_err(g_ref, g_fast) <= FP32_GRAD_REL_TOL, name


def test_scan_split_in_two_with_carried_state_equals_one_scan():
    inputs = _ssd_inputs(2, 45, 4, 3, 2, 5)
    inputs.pop("initial_state")
    y_full, h_full = ssd_chunked(**inputs, chunk_size=8, dt_softplus=True, return_final_state=True)
    first = {k: (v[:, :29] if v.dim() >= 3 else v) for k, v in inputs.items()}
    second = {k: (v[:, 29:] if v.dim() >= 3 else v) for k, v in inputs.items()}
    y1, h1 = ssd_chunked(**first, chunk_size=8, dt_softplus=True, return_final_state=True)
    y2, h2 = ssd_chunked(**second, chunk_size=8, dt_softplus=True, initial_state=h1, return_final_state=True)
    assert _rel_err(y_full, torch.cat([y1, y2], 1)) <= FP32_REL_TOL
    assert _rel_err(h_full, h2) <= FP32_REL_TOL


def test_state_update_steps_equal_the_reference_scan():
    inputs = _ssd_inputs(2, 12, 4, 3, 2, 5, dt_scale=2.0)
    kwargs = dict(dt_softplus=True, dt_limit=(0.0, 3.0))
    y_ref, h_ref = ssd_scan_ref(**inputs, **kwargs, return_final_state=True)
    state = inputs["initial_state"].clone()
    steps = [
        ssd_state_update(
            state,
            inputs["x"][:, t],
            inputs["dt"][:, t],
            inputs["A"],
            inputs["B"][:, t],
            inputs["C"][:, t],
            D=inputs["D"],
            z=inputs["z"][:, t],
            dt_bias=inputs["dt_bias"],
            **kwargs,
        )
        for t in range(12)
    ]
    assert _rel_err(y_ref, torch.stack(steps, 1)) <= FP32_REL_TOL
    assert _rel_err(h_ref, state) <= FP32_REL_TOL


def test_bfloat16_inputs_return_bfloat16_with_fp32_state():
    inputs = {k: v.to(torch.bfloat16) for k, v in _ssd_inputs(1, 20, 2, 4, 1, 4).items()}
    y, h_last = ssd_chunked(**inputs, chunk_size=8, dt_softplus=True, return_final_state=True)
    assert y.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    y_ref = ssd_scan_ref(**inputs, dt_softplus=True)
    assert _rel_err(y_ref.float(), y.float()) <= 1e-2  # bf16 output rounding


@pytest.mark.parametrize("length", [1, 30])
def test_chunked_ssd_leaves_its_inputs_unchanged(length):
    inputs = _ssd_inputs(2, length, 4, 3, 2, 5)
    before = {k: v.clone() for k, v in inputs.items()}
    ssd_chunked(**inputs, chunk_size=8, dt_softplus=True, return_final_state=True)
    for key, value in inputs.items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("fused", [False, True])  # the PyTorch path, and the fused CPU kernel when it builds
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 2, 9])  # shorter than the left context, and longer
def test_channels_last_conv_matches_reference_values_and_gradients(k, length, fused, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_enabled_override", fused)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, length, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, k, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 6, k, generator=gen, dtype=torch.float64, requires_grad=True)
    got = causal_conv1d_rows(x, weight, bias, state, activation="silu")
    expected = causal_conv1d_ref(x.transpose(1, 2), weight, bias, state, activation="silu").transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)  # the reference sums in fp32
    assert torch.autograd.gradcheck(
        lambda *args: causal_conv1d_rows(*args, activation="silu"), (x, weight, bias, state)
    )
    assert torch.autograd.gradcheck(lambda *args: causal_conv1d_rows(*args), (x, weight))


@pytest.mark.parametrize("p,n,chunk", [(32, 16, 256), (64, 128, 256), (3, 5, 4), (8, 16, 1)])
def test_cpu_dispatch_picks_its_own_chunk_length_without_changing_the_result(monkeypatch, p, n, chunk):
    used = []
    real = ops_ssd.ssd_chunked

    def spy(x, dt, A, B, C, chunk_size, *args):
        used.append(chunk_size)
        return real(x, dt, A, B, C, chunk_size, *args)

    monkeypatch.setattr(ops_ssd, "ssd_chunked", spy)
    monkeypatch.setattr(ops_ssd, "kernels_available_for", lambda tensor: False)  # the PyTorch path's choice
    inputs = _ssd_inputs(2, 70, 2, p, 1, n, dt_shift=1.0)
    y, h_last = ssd_scan(**inputs, chunk_size=chunk, dt_softplus=True, return_final_state=True)
    y_ref, h_ref = ssd_scan_ref(**inputs, dt_softplus=True, return_final_state=True)
    assert _rel_err(y_ref, y) <= FP32_REL_TOL and _rel_err(h_ref, h_last) <= FP32_REL_TOL
    # Never longer than the configured chunk or the 64-step cap; near sqrt(head_dim * state) otherwise.
    assert len(used) == 1 and 1 <= used[0] <= min(chunk, 64)
    assert used[0] == min(chunk, 64, ops_ssd._torch_chunk(chunk, p, n))
    if chunk >= 64:
        assert used[0] / 2 <= (p * n) ** 0.5 <= used[0] * 2


def test_mismatched_shapes_are_a_clear_error():
    inputs = _ssd_inputs(1, 5, 4, 3, 3, 5)  # 3 groups do not divide 4 heads
    with pytest.raises(ValueError, match="g dividing h"):
        ssd_chunked(**inputs, chunk_size=4)


def test_cpu_tensors_never_reach_kernels(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a CUDA kernel was called for CPU tensors")

    monkeypatch.setattr(
        ssm_ops, "_KERNELS", {"mamba_chunk_scan_combined": boom, "selective_state_update": boom}
    )
    inputs = _ssd_inputs(1, 5, 2, 3, 1, 4)
    ssd_scan(**inputs, chunk_size=4)
    ssd_state_update(
        inputs["initial_state"],
        inputs["x"][:, 0],
        inputs["dt"][:, 0],
        inputs["A"],
        inputs["B"][:, 0],
        inputs["C"][:, 0],
    )


def _mamba_ssm_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm's `selective_state_update` contract for a Mamba-2 state (b, h, p, n): per-(h, p) dt, A, D."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    r = x.shape[1] // B.shape[1]
    B, C = B.repeat_interleave(r, 1)[:, :, None], C.repeat_interleave(r, 1)[:, :, None]
    state.copy_(torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * B)
    y = (state * C).sum(-1) + (0 if D is None else x * D)
    return y if z is None else y * torch.nn.functional.silu(z)


@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.0, 0.3)])
def test_kernel_dispatch_passes_mamba_ssm_shapes(monkeypatch, dt_limit):
    """With a stand-in for the kernels (same contracts), the dispatched ops equal the PyTorch path."""

    def chunk_kernel(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, **kw):
        assert A.shape == (x.shape[2],) and A.dtype == torch.float32
        out = ssd_scan_ref(
            x,
            dt,
            A,
            B,
            C,
            D,
            z,
            dt_bias,
            kw["dt_softplus"],
            kw["dt_limit"],
            initial_states,
            kw["return_final_states"],
        )
        return out

    kernels = {"mamba_chunk_scan_combined": chunk_kernel, "selective_state_update": _mamba_ssm_state_update}
    monkeypatch.setattr(ops_ssd, "_cuda_kernel", lambda name, tensor: kernels[name])
    inputs = _ssd_inputs(2, 6, 4, 3, 2, 5, dt_scale=2.0)
    kwargs = dict(D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True, dt_limit=dt_limit)
    y, h_last = ssd_scan(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 4, return_final_state=True, **kwargs
    )
    y_ref, h_ref = ssd_scan_ref(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], return_final_state=True, **kwargs
    )
    assert _rel_err(y_ref, y) <= FP32_REL_TOL and _rel_err(h_ref, h_last) <= FP32_REL_TOL
    state_kernel, state_torch = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    step = (inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"], inputs["B"][:, 0], inputs["C"][:, 0])
    y_kernel = ssd_state_update(state_kernel, *step, z=inputs["z"][:, 0], **kwargs)
    monkeypatch.setattr(ops_ssd, "_cuda_kernel", lambda name, tensor: None)
    y_torch = ssd_state_update(state_torch, *step, z=inputs["z"][:, 0], **kwargs)
    assert _rel_err(y_torch, y_kernel) <= FP32_REL_TOL and _rel_err(state_torch, state_kernel) <= FP32_REL_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ssd_matches_torch_ssd_on_cuda(dtype):
    if not ssm_ops._load_kernels().get("mamba_chunk_scan_combined"):
        pytest.skip("mamba_ssm's Triton SSD kernel is not installed")
    inputs = {k: v.cuda() for k, v in _ssd_inputs(2, 300, 8, 64, 2, 64, dt_scale=1.0).items()}
    inputs.pop("z")
    inputs["x"], inputs["B"], inputs["C"] = (inputs[k].to(dtype) for k in ("x", "B", "C"))
    y, h_last = ssd_scan(**inputs, chunk_size=64, dt_softplus=True, return_final_state=True)
    y_torch, h_torch = ssd_chunked(**inputs, chunk_size=64, dt_softplus=True, return_final_state=True)
    tol = {torch.float32: 1e-3, torch.bfloat16: 2e-2}[dtype]
    assert _rel_err(y_torch.float(), y.float()) <= tol and _rel_err(h_torch, h_last) <= tol

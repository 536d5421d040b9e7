"""The fast PyTorch SSM ops against their plain sequential references, and kernel dispatch."""

import pytest
import torch

from vlm_mamba_hf import ssm_ops
from vlm_mamba_hf.ssm_ops import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    selective_scan,
    selective_scan_ref,
    selective_scan_torch,
    selective_state_update,
)

FP32_REL_TOL = 1e-5  # forward, fp32
FP32_GRAD_REL_TOL = 1e-4  # gradients, fp32


def _scan_inputs(b, d, n, length, dt_shift=0.0, dt_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(b, d, length, generator=gen),
        delta=torch.randn(b, d, length, generator=gen) * dt_scale + dt_shift,
        A=-torch.exp(torch.randn(d, n, generator=gen)),
        B=torch.randn(b, n, length, generator=gen),
        C=torch.randn(b, n, length, generator=gen),
        D=torch.randn(d, generator=gen),
        z=torch.randn(b, d, length, generator=gen),
        delta_bias=torch.randn(d, generator=gen) * 0.5,
        initial_state=torch.randn(b, d, n, generator=gen),
    )


def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((ref - other).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize(
    "b,d,n,length,dt_shift",
    [
        (2, 8, 4, 1, 0.0),
        (2, 8, 4, 7, 0.0),
        (3, 16, 8, 300, 0.0),
        (2, 16, 8, 257, 10.0),  # pre-softplus dt around +10: very large steps
        (2, 1024, 16, 70, 0.0),  # a state large enough for the sequential path
        (1, 4, 3, 4096, 5.0),
    ],
)
def test_fast_scan_matches_sequential_reference(b, d, n, length, dt_shift):
    inputs = _scan_inputs(b, d, n, length, dt_shift=dt_shift, dt_scale=3.0)
    y_ref, h_ref = selective_scan_ref(**inputs, delta_softplus=True, return_final_state=True)
    y, h = selective_scan_torch(**inputs, delta_softplus=True, return_final_state=True)
    assert torch.isfinite(y).all()
    assert _rel_err(y_ref, y) <= FP32_REL_TOL
    assert _rel_err(h_ref, h) <= FP32_REL_TOL


def test_fast_scan_without_initial_state_or_extras_matches_reference():
    inputs = _scan_inputs(2, 8, 4, 50)
    for key in ("D", "z", "delta_bias", "initial_state"):
        inputs.pop(key)
    assert _rel_err(selective_scan_ref(**inputs), selective_scan_torch(**inputs)) <= FP32_REL_TOL


@pytest.mark.parametrize(
    "b,d,n,length,dt_shift", [(2, 6, 4, 9, 10.0), (2, 8, 3, 200, 0.0), (1, 1024, 16, 40, 2.0)]
)
def test_fast_scan_gradients_match_reference(b, d, n, length, dt_shift):
    inputs = _scan_inputs(b, d, n, length, dt_shift=dt_shift, dt_scale=2.0)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(1)
    grad_y = torch.randn(b, d, length, generator=gen)
    grad_h = torch.randn(b, d, n, generator=gen)

    def grads(fn):
        y, h = fn(**leaves, delta_softplus=True, return_final_state=True)
        return torch.autograd.grad((y * grad_y).sum() + (h * grad_h).sum(), list(leaves.values()))

    for name, g_ref, g in zip(leaves, grads(selective_scan_ref), grads(selective_scan_torch)):
        assert _rel_err(g_ref, g) <= FP32_GRAD_REL_TOL, name


def test_scan_split_in_two_with_carried_state_equals_one_scan():
    inputs = _scan_inputs(2, 8, 4, 40)
    inputs.pop("initial_state")
    y_full, h_full = selective_scan_torch(**inputs, delta_softplus=True, return_final_state=True)
    first = {k: (v[..., :25] if v.dim() == 3 else v) for k, v in inputs.items()}
    second = {k: (v[..., 25:] if v.dim() == 3 else v) for k, v in inputs.items()}
    y1, h1 = selective_scan_torch(**first, delta_softplus=True, return_final_state=True)
    y2, h2 = selective_scan_torch(**second, delta_softplus=True, initial_state=h1, return_final_state=True)
    assert _rel_err(y_full, torch.cat([y1, y2], -1)) <= FP32_REL_TOL
    assert _rel_err(h_full, h2) <= FP32_REL_TOL


def test_state_update_steps_equal_the_reference_scan():
    inputs = _scan_inputs(2, 8, 4, 12)
    y_ref, h_ref = selective_scan_ref(**inputs, delta_softplus=True, return_final_state=True)
    state = inputs["initial_state"].clone()
    ys = []
    for t in range(12):
        ys.append(
            selective_state_update(
                state,
                inputs["u"][..., t],
                inputs["delta"][..., t],
                inputs["A"],
                inputs["B"][..., t],
                inputs["C"][..., t],
                D=inputs["D"],
                z=inputs["z"][..., t],
                dt_bias=inputs["delta_bias"],
                dt_softplus=True,
            )
        )
    assert _rel_err(y_ref, torch.stack(ys, -1)) <= FP32_REL_TOL
    assert _rel_err(h_ref, state) <= FP32_REL_TOL


@pytest.mark.parametrize("k", [1, 2, 4])
def test_causal_conv_matches_explicit_sum(k):
    x, w, bias = torch.randn(2, 6, 11), torch.randn(6, k), torch.randn(6)
    torch.testing.assert_close(
        causal_conv1d(x, w, bias, activation="silu"), causal_conv1d_ref(x, w, bias, activation="silu")
    )
    state = torch.randn(2, 6, k)
    torch.testing.assert_close(
        causal_conv1d(x, w, bias, initial_state=state), causal_conv1d_ref(x, w, bias, initial_state=state)
    )


def test_causal_conv_is_causal():
    x, w = torch.randn(1, 3, 10), torch.randn(3, 4)
    y = causal_conv1d(x, w)
    x2 = x.clone()
    x2[..., 6:] += 1.0
    torch.testing.assert_close(causal_conv1d(x2, w)[..., :6], y[..., :6])


def test_conv_update_rolls_state_and_matches_full_conv():
    k = 4
    x, w, bias = torch.randn(2, 5, 9), torch.randn(5, k), torch.randn(5)
    full = causal_conv1d(x, w, bias, activation="silu")
    state = torch.zeros(2, 5, k)
    steps = [causal_conv1d_update(x[..., t], state, w, bias, activation="silu") for t in range(9)]
    torch.testing.assert_close(torch.stack(steps, -1), full)
    torch.testing.assert_close(state, x[..., -k:])


def test_cpu_tensors_never_reach_kernels(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a CUDA kernel was called for CPU tensors")

    fake = {name: boom for name in ssm_ops.kernels_available()}
    monkeypatch.setattr(ssm_ops, "_KERNELS", fake)
    inputs = _scan_inputs(1, 4, 2, 5)
    inputs.pop("initial_state")
    selective_scan(**inputs)
    causal_conv1d(torch.randn(1, 4, 5), torch.randn(4, 4))
    causal_conv1d_update(torch.randn(1, 4), torch.zeros(1, 4, 4), torch.randn(4, 4))
    selective_state_update(
        torch.zeros(1, 4, 2),
        torch.randn(1, 4),
        torch.randn(1, 4),
        -torch.ones(4, 2),
        torch.randn(1, 2),
        torch.randn(1, 2),
    )


def test_package_imports_without_kernels():
    import importlib.util

    assert importlib.util.find_spec("mamba_ssm") is None or torch.cuda.is_available()
    import vlm_mamba_hf  # noqa: F401

    assert set(ssm_ops.kernels_available()) == {
        "selective_scan_fn",
        "selective_state_update",
        "causal_conv1d_fn",
        "causal_conv1d_update",
        "mamba_inner_fn",
    }
    assert not ssm_ops.kernel_available("mamba_inner_fn", torch.device("cpu"))

"""The fused CPU kernels (`cpu_kernels`, built from csrc/ with the system compiler) against the references.

The SSD scan against the sequential `ssd_scan_ref` (outputs, final state and every gradient, fp64 and fp32),
the causal conv against the PyTorch path it replaces, the dispatch, the fallback when no compiler works,
and a whole Mamba-2 VLM training step with the kernels on and off.
"""

import shutil
import warnings

import pytest
import torch
from conftest import tiny_mamba2_config

from vlm_mamba_hf import (
    VLMambaConfig,
    VLMambaForCausalLM,
    VLMambaForConditionalGeneration,
    cpu_kernels,
    ops_ssd,
)
from vlm_mamba_hf.modeling_vlm_mamba import VLMambaGatedRMSNorm, VLMambaMamba2Mixer, VLMambaRMSNorm
from vlm_mamba_hf.ops_ssd import causal_conv1d_rows, ssd_chunked, ssd_fused_cpu, ssd_scan, ssd_scan_ref

pytestmark = pytest.mark.skipif(
    cpu_kernels._compiler() is None, reason="no C++ compiler: the fused CPU kernels cannot be built"
)


@pytest.fixture(autouse=True)
def _kernels_on():
    cpu_kernels.set_cpu_kernels_enabled(True)
    yield
    cpu_kernels.set_cpu_kernels_enabled(None)


def _ssd_inputs(b, length, h, p, g, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    return dict(
        x=rand(b, length, h, p),
        dt=rand(b, length, h, scale=2.0),
        A=-torch.exp(rand(h)),
        B=rand(b, length, g, n),
        C=rand(b, length, g, n),
        D=rand(h),
        z=rand(b, length, h, p),
        dt_bias=rand(h, scale=0.5),
        initial_state=rand(b, h, p, n),
    )


def _outputs_and_grads(fn, inputs, through_y=True, through_state=True, **kwargs):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, final = fn(**leaves, dt_softplus=True, return_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(7)
    loss = 0
    if through_y:
        loss = loss + (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    if through_state:
        loss = (
            loss
            + (final * torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)).sum()
        )
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return y, final, dict(zip(leaves, grads))


def _rel(ref, other):
    return ((ref - other).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize(
    "b,length,h,p,g,n",
    [
        (2, 1, 4, 8, 2, 5),  # one step
        (2, 37, 4, 16, 2, 8),  # head_dim 16 (a specialised size); two checkpoint segments, the last partial
        (2, 70, 4, 32, 1, 16),  # head_dim 32, one group for all heads; three segments
        (1, 33, 2, 64, 2, 4),  # head_dim 64
        (2, 65, 3, 5, 3, 3),  # an unspecialised head_dim; one head per group
        (2, 40, 4, 5, 2, 3),  # an unspecialised head_dim, two heads per group
    ],
)
def test_fused_ssd_matches_sequential_reference_fp64(b, length, h, p, g, n):
    inputs = _ssd_inputs(b, length, h, p, g, n, torch.float64)
    y_ref, final_ref, grads_ref = _outputs_and_grads(ssd_scan_ref, inputs)
    y, final, grads = _outputs_and_grads(ssd_fused_cpu, inputs)
    assert y.dtype == final.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    for name, ref in grads_ref.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("through_y,through_state", [(True, False), (False, True)])
def test_fused_ssd_gradients_when_only_one_output_is_used(through_y, through_state):
    inputs = _ssd_inputs(2, 40, 4, 8, 2, 4, torch.float64, seed=1)
    _, _, grads_ref = _outputs_and_grads(ssd_scan_ref, inputs, through_y, through_state)
    _, _, grads = _outputs_and_grads(ssd_fused_cpu, inputs, through_y, through_state)
    for name, ref in grads_ref.items():
        if ref is None:
            assert grads[name] is None or not grads[name].any(), name
        else:
            torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_fused_ssd_fp32_matches_fp64_reference_with_per_channel_skip_and_dt_limit():
    inputs = _ssd_inputs(2, 90, 4, 32, 2, 16, torch.float32, seed=2)
    inputs["D"] = torch.randn(4, 32)
    kwargs = dict(dt_limit=(0.01, 0.8))
    y_ref, final_ref, grads_ref = _outputs_and_grads(
        ssd_scan_ref, {k: v.double() for k, v in inputs.items()}, **kwargs
    )
    y, final, grads = _outputs_and_grads(ssd_fused_cpu, inputs, **kwargs)
    assert y.dtype == final.dtype == torch.float32
    assert _rel(y_ref, y.double()) < 1e-5 and _rel(final_ref, final.double()) < 1e-5
    for name, ref in grads_ref.items():
        assert _rel(ref, grads[name].double()) < 1e-4, name


def test_fused_ssd_gradcheck():
    inputs = _ssd_inputs(1, 5, 2, 3, 1, 2, torch.float64, seed=3)
    names = list(inputs)

    def fn(*tensors):
        y, final = ssd_fused_cpu(**dict(zip(names, tensors)), dt_softplus=True, return_final_state=True)
        return y, final

    assert torch.autograd.gradcheck(fn, [v.requires_grad_() for v in inputs.values()])


def test_fused_ssd_gives_the_same_result_on_several_threads():
    inputs = _ssd_inputs(4, 50, 4, 16, 2, 8, torch.float32, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _outputs_and_grads(ssd_fused_cpu, inputs)
        torch.set_num_threads(3)
        three = _outputs_and_grads(ssd_fused_cpu, inputs)
    finally:
        torch.set_num_threads(threads)
    # Each (batch, head) pair is one task whatever the thread count: bit-identical, B and C grads included.
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    for name in one[2]:
        assert torch.equal(one[2][name], three[2][name]), name


@pytest.mark.parametrize("p", [32, 5])
def test_fused_ssd_backward_per_group_and_per_head_tasks_agree_with_the_reference(p):
    """With fewer (batch, group) pairs than threads the backward pass runs one task per head and sums their B
    and C gradients after; otherwise one task per group sums them as it goes. Both against the reference."""
    inputs = _ssd_inputs(1, 45, 4, p, 1, 16, torch.float64, seed=5)
    _, _, grads_ref = _outputs_and_grads(ssd_scan_ref, inputs)
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):  # 1: one task for the group's four heads; 3: one task per head
            torch.set_num_threads(count)
            _, _, grads = _outputs_and_grads(ssd_fused_cpu, inputs)
            for name, ref in grads_ref.items():
                torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-9, msg=f"{count}: {name}")
    finally:
        torch.set_num_threads(threads)


def test_ssd_scan_dispatches_cpu_tensors_to_the_kernel_unless_disabled(monkeypatch):
    calls = []
    real = ops_ssd.ssd_scan_cpu
    monkeypatch.setattr(ops_ssd, "ssd_scan_cpu", lambda *a: calls.append(1) or real(*a))
    inputs = _ssd_inputs(2, 20, 4, 8, 2, 4, torch.float32)
    fused = ssd_scan(**inputs, chunk_size=8, dt_softplus=True)
    assert calls == [1]
    chunked = ssd_chunked(**inputs, chunk_size=8, dt_softplus=True)
    torch.testing.assert_close(fused, chunked, rtol=1e-5, atol=1e-5)
    cpu_kernels.set_cpu_kernels_enabled(False)
    ssd_scan(**inputs, chunk_size=8, dt_softplus=True)
    assert calls == [1]
    cpu_kernels.set_cpu_kernels_enabled(None)
    monkeypatch.setenv("VLM_MAMBA_CPU_KERNELS", "0")
    assert not cpu_kernels.cpu_kernels_enabled()
    ssd_scan(**inputs, chunk_size=8, dt_softplus=True)
    assert calls == [1]


@pytest.mark.parametrize(
    "k,activation,with_bias,with_state",
    [
        (4, "silu", True, False),
        (4, None, False, True),
        (3, "silu", True, True),
        (1, "silu", False, False),
        (14, "silu", True, True),  # more taps than steps
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_conv_matches_the_pytorch_path(k, activation, with_bias, with_state, dtype):
    gen = torch.Generator().manual_seed(k)
    c = 70  # a whole tile of the kernel's 64 channels and a partial one
    x = torch.randn(3, 11, c, generator=gen, dtype=dtype)
    weight = torch.randn(c, k, generator=gen, dtype=dtype)
    bias = torch.randn(c, generator=gen, dtype=dtype) if with_bias else None
    state = torch.randn(3, c, k + 2, generator=gen, dtype=dtype) if with_state else None
    upstream = torch.randn(3, 11, c, generator=gen, dtype=dtype)
    results = []
    for enabled in (False, True):
        cpu_kernels.set_cpu_kernels_enabled(enabled)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, state) if t is not None]
        args = iter(leaves)
        out = causal_conv1d_rows(
            next(args),
            next(args),
            next(args) if with_bias else None,
            next(args) if with_state else None,
            activation,
        )
        results.append((out, torch.autograd.grad((out * upstream).sum(), leaves)))
    (ref, ref_grads), (out, grads) = results
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, compiler):
    monkeypatch.setenv("VLM_MAMBA_KERNEL_CACHE", str(tmp_path / "cache"))
    if compiler == "missing":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.setattr(shutil, "which", lambda name: None)
        expected = "no C++ compiler"
    else:
        failing = tmp_path / "failing-cxx"
        failing.write_text("#!/bin/sh\necho 'error: this compiler always fails' >&2\nexit 1\n")
        failing.chmod(0o755)
        monkeypatch.setenv("CXX", str(failing))
        expected = "this compiler always fails"
    cpu_kernels._reset_for_tests()
    try:
        inputs = _ssd_inputs(1, 12, 2, 4, 1, 3, torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = ssd_scan(**inputs, chunk_size=4, dt_softplus=True)
            ssd_scan(**inputs, chunk_size=4, dt_softplus=True)
        messages = [str(w.message) for w in caught if "fused CPU" in str(w.message)]
        assert len(messages) == 1 and expected in messages[0], messages
        torch.testing.assert_close(y, ssd_chunked(**inputs, chunk_size=4, dt_softplus=True))
        with pytest.raises(RuntimeError, match="not available"):
            ssd_fused_cpu(**inputs, dt_softplus=True)
    finally:
        cpu_kernels._reset_for_tests()


def test_the_library_is_cached_under_a_name_that_hashes_the_source_and_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_MAMBA_KERNEL_CACHE", str(tmp_path))
    cpu_kernels._reset_for_tests()
    try:
        assert cpu_kernels.load_library() is not None
        built = sorted(tmp_path.glob("mamba_cpu-*.so"))
        assert len(built) == 1 and sorted(tmp_path.iterdir()) == built  # no temporary file left behind
        cpu_kernels._reset_for_tests()
        assert cpu_kernels.load_library() is not None  # found, not rebuilt
        assert sorted(tmp_path.glob("mamba_cpu-*.so")) == built
        source = tmp_path / "edited.cpp"
        source.write_text(cpu_kernels._SOURCE.read_text() + "\n// edited\n")
        monkeypatch.setattr(cpu_kernels, "_SOURCE", source)
        cpu_kernels._reset_for_tests()
        assert cpu_kernels.load_library() is not None
        assert len(list(tmp_path.glob("mamba_cpu-*.so"))) == 2  # an edited source never loads the old build
        monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "another CPU")
        cpu_kernels._reset_for_tests()
        assert cpu_kernels.load_library() is not None
        assert len(list(tmp_path.glob("mamba_cpu-*.so"))) == 3  # nor does another CPU (-march=native)
    finally:
        cpu_kernels._reset_for_tests()


def test_vlm_training_step_is_the_same_with_the_kernels_on_and_off():
    config = VLMambaConfig(
        text_config=tiny_mamba2_config(head_dim=16, num_heads=4, n_groups=1).to_dict(),
        vision_config=dict(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, ssm_layer="mamba2", head_dim=16
        ),
        image_token_id=5,
    )
    torch.manual_seed(0)
    model = VLMambaForConditionalGeneration(config).train()
    ids = torch.randint(6, 90, (2, 14))
    ids[:, 1:5] = 5
    batch = dict(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16), labels=ids.clone())
    results = []
    for enabled in (False, True):
        cpu_kernels.set_cpu_kernels_enabled(enabled)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and any("conv1d" in n for n in grads)
    for name, ref in grads_ref.items():
        assert _rel(ref, grads[name]) < 1e-4, name


@pytest.mark.parametrize("gated", [False, True])
def test_fused_norms_match_the_pytorch_path(gated):
    gen = torch.Generator().manual_seed(5)
    # x and the gate are slices of wider tensors, as the mixer's in_proj split hands them over.
    wide, gate_source = torch.randn(3, 9, 40, generator=gen), torch.randn(3, 9, 40, generator=gen)
    norm = VLMambaGatedRMSNorm(24, 8, eps=1e-5) if gated else VLMambaRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
    upstream = torch.randn(3, 9, 24, generator=gen)
    results = []
    for enabled in (False, True):
        cpu_kernels.set_cpu_kernels_enabled(enabled)
        x_wide, gate_wide = wide.clone().requires_grad_(), gate_source.clone().requires_grad_()
        x, gate = x_wide[..., 4:28], gate_wide[..., 10:34]
        out = norm(x, gate) if gated else norm(x)
        leaves = [x_wide, gate_wide, norm.weight] if gated else [x_wide, norm.weight]
        results.append((out, torch.autograd.grad((out * upstream).sum(), leaves)))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_norm_fp64_against_the_formula():
    gen = torch.Generator().manual_seed(8)
    x, gate = (
        torch.randn(2, 5, 12, generator=gen, dtype=torch.float64),
        torch.randn(2, 5, 12, generator=gen, dtype=torch.float64),
    )
    weight = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5
    h = x * torch.nn.functional.silu(gate)
    groups = h.unflatten(-1, (3, 4))
    expected = weight * (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-6)).flatten(-2)
    torch.testing.assert_close(
        cpu_kernels.rms_norm_cpu(x, weight, 1e-6, gate, 4), expected, rtol=1e-12, atol=1e-12
    )
    leaves = [t.clone().requires_grad_() for t in (x, weight, gate)]
    assert torch.autograd.gradcheck(lambda a, w, g: cpu_kernels.rms_norm_cpu(a, w, 1e-6, g, 4), leaves)
    assert torch.autograd.gradcheck(lambda a, w: cpu_kernels.rms_norm_cpu(a, w, 1e-6), leaves[:2])


def _sequential_s6(u, delta, A, B, C, h0):
    """The Mamba-1 recurrence one step at a time, in the inputs' dtype (fp64 here)."""
    state, ys = h0, []
    for t in range(u.shape[-1]):
        state = (
            torch.exp(delta[:, :, t, None] * A) * state
            + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        )
        ys.append((state * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1), state


@pytest.mark.parametrize("b,d,length,n", [(2, 5, 37, 4), (1, 3, 1, 16), (2, 6, 70, 16), (3, 2, 33, 7)])
def test_fused_selective_scan_matches_sequential_fp64(b, d, length, n):
    gen = torch.Generator().manual_seed(length)
    inputs = [
        torch.randn(b, d, length, generator=gen, dtype=torch.float64),
        torch.rand(b, d, length, generator=gen, dtype=torch.float64),
        -2 * torch.rand(d, n, generator=gen, dtype=torch.float64),
        torch.randn(b, n, length, generator=gen, dtype=torch.float64),
        torch.randn(b, n, length, generator=gen, dtype=torch.float64),
        torch.randn(b, d, n, generator=gen, dtype=torch.float64),
    ]
    upstream_y = torch.randn(b, d, length, generator=gen, dtype=torch.float64)
    upstream_state = torch.randn(b, d, n, generator=gen, dtype=torch.float64)
    results = []
    for fn in (_sequential_s6, cpu_kernels.selective_scan_cpu):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, state = fn(*leaves)
        grads = torch.autograd.grad((y * upstream_y).sum() + (state * upstream_state).sum(), leaves)
        results.append((y, state, grads))
    (y_ref, state_ref, grads_ref), (y, state, grads) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(("u", "delta", "A", "B", "C", "h0"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_fused_selective_scan_gradcheck_and_threads():
    gen = torch.Generator().manual_seed(11)
    shapes = [(1, 2, 6), (1, 2, 6), (2, 3), (1, 3, 6), (1, 3, 6), (1, 2, 3)]
    inputs = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    inputs[1], inputs[2] = inputs[1].abs(), -inputs[2].abs()
    assert torch.autograd.gradcheck(cpu_kernels.selective_scan_cpu, [t.requires_grad_() for t in inputs])
    big = [torch.randn(3, 40, 50), torch.rand(3, 40, 50), -torch.rand(40, 16), torch.randn(3, 16, 50)]
    big += [torch.randn(3, 16, 50), torch.randn(3, 40, 16)]
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_() for t in big]
            y, state = cpu_kernels.selective_scan_cpu(*leaves)
            runs.append((y, state, torch.autograd.grad(y.sin().sum() + state.sum(), leaves)))
    finally:
        torch.set_num_threads(threads)
    (y1, s1, g1), (y3, s3, g3) = runs
    assert torch.equal(y1, y3) and torch.equal(s1, s3)
    for a, c in zip(g1, g3):  # B and C gradients are summed per thread, then added: equal up to rounding
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_selective_scan_dispatch_uses_the_kernel_and_matches_the_reference(monkeypatch):
    from vlm_mamba_hf import ssm_ops

    calls = []
    real = ssm_ops.selective_scan_cpu
    monkeypatch.setattr(ssm_ops, "selective_scan_cpu", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(12)
    b, d, length, n = 2, 8, 45, 16
    args = [torch.randn(b, d, length, generator=gen), torch.randn(b, d, length, generator=gen)]
    args += [-torch.rand(d, n, generator=gen), torch.randn(b, n, length, generator=gen)]
    args += [torch.randn(b, n, length, generator=gen)]
    extras = dict(
        D=torch.randn(d, generator=gen),
        z=torch.randn(b, d, length, generator=gen),
        delta_bias=torch.randn(d, generator=gen),
        initial_state=torch.randn(b, d, n, generator=gen),
    )
    results = []
    for fn in (ssm_ops.selective_scan_ref, ssm_ops.selective_scan):
        leaves = [t.clone().requires_grad_() for t in args + list(extras.values())]
        kw = dict(zip(extras, leaves[5:]))
        y, state = fn(*leaves[:5], **kw, delta_softplus=True, return_final_state=True)
        results.append((y, state, torch.autograd.grad((y * y.detach().cos()).sum() + state.sum(), leaves)))
    assert calls == [1]
    (y_ref, s_ref, g_ref), (y, s, g) = results
    assert _rel(y_ref, y) < 1e-5 and _rel(s_ref, s) < 1e-5
    for a, c in zip(g_ref, g):
        assert _rel(a, c) < 1e-4


def test_an_unwritable_cache_builds_in_the_temp_folder(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VLM_MAMBA_KERNEL_CACHE", str(blocker / "kernels"))
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu_kernels._reset_for_tests()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: the kernels still build
            assert cpu_kernels.load_library() is not None
        assert list((tmp_path / "tmp").glob("vlm_mamba_hf-kernels-*/mamba_cpu-*.so"))
    finally:
        cpu_kernels._reset_for_tests()


# --- the fused Mamba-2 mixer (in_proj output -> gated norm output) ----------------------------------------


def _mixer_reference(
    zxbcdt, weight, bias, dt_bias, A, D, norm_weight, d_inner, groups, state, head_dim, norm_group, eps
):
    """The same mixer from PyTorch ops in the inputs' dtype: F.conv1d, the sequential SSD, the gated norm."""
    conv_dim, k = weight.shape
    heads = zxbcdt.shape[-1] - d_inner - conv_dim
    z, xbc, dt = zxbcdt.split([d_inner, conv_dim, heads], dim=-1)
    padded = torch.nn.functional.pad(xbc.transpose(1, 2), (k - 1, 0))
    xbc = torch.nn.functional.silu(torch.nn.functional.conv1d(padded, weight[:, None], bias, groups=conv_dim))
    x, B, C = xbc.transpose(1, 2).split([d_inner, groups * state, groups * state], dim=-1)
    y = ssd_scan_ref(
        x.unflatten(-1, (heads, head_dim)),
        dt,
        A,
        B.unflatten(-1, (groups, state)),
        C.unflatten(-1, (groups, state)),
        D=D,
        dt_bias=dt_bias,
        dt_softplus=True,
    )
    h = (y.flatten(-2) * torch.nn.functional.silu(z)).unflatten(-1, (-1, norm_group))
    return norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)


def _mixer_inputs(b, length, d_inner, groups, state, head_dim, k, with_bias, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    heads, conv_dim = d_inner // head_dim, d_inner + 2 * groups * state
    return dict(
        zxbcdt=rand(b, length, d_inner + conv_dim + heads),
        weight=rand(conv_dim, k, scale=0.5),
        bias=rand(conv_dim, scale=0.3) if with_bias else None,
        dt_bias=rand(heads, scale=0.5, shift=-1.0),
        A=-torch.exp(rand(heads, scale=0.5)),
        D=rand(heads),
        norm_weight=rand(d_inner, scale=0.2, shift=1.0),
    )


def _mixer_outputs_and_grads(fn, inputs, sizes):
    leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}
    out = fn(*leaves.values(), **sizes)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    present = {k: v for k, v in leaves.items() if v is not None}
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), list(present.values()))
    return out, dict(zip(present, grads))


@pytest.mark.parametrize(
    "b,length,d_inner,groups,state,head_dim,norm_group,k,with_bias",
    [
        (2, 1, 32, 2, 4, 8, 16, 4, True),  # one step: every conv tap but the last reads the zero left context
        # two checkpoint segments, the last partial; a norm group per B/C group
        (2, 37, 64, 2, 8, 16, 32, 4, True),
        (2, 70, 64, 1, 16, 32, 64, 3, False),  # the default model's head_dim and state size; no conv bias
        (1, 33, 60, 3, 5, 5, 20, 4, True),  # an unspecialised head_dim; one head per group
    ],
)
def test_fused_mamba2_mixer_matches_a_pytorch_reference_fp64(
    b, length, d_inner, groups, state, head_dim, norm_group, k, with_bias
):
    inputs = _mixer_inputs(b, length, d_inner, groups, state, head_dim, k, with_bias, torch.float64)
    sizes = dict(
        d_inner=d_inner, groups=groups, state=state, head_dim=head_dim, norm_group=norm_group, eps=1e-5
    )
    out_ref, grads_ref = _mixer_outputs_and_grads(_mixer_reference, inputs, sizes)
    out, grads = _mixer_outputs_and_grads(cpu_kernels.mamba2_mixer_cpu, inputs, sizes)
    assert out.dtype == torch.float64 and out.shape == (b, length, d_inner)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")

    fp32 = {k: None if v is None else v.float() for k, v in inputs.items()}
    out32, grads32 = _mixer_outputs_and_grads(cpu_kernels.mamba2_mixer_cpu, fp32, sizes)
    assert out32.dtype == torch.float32 and _rel(out_ref, out32.double()) < 1e-5
    for name, ref in grads_ref.items():
        assert _rel(ref, grads32[name].double()) < 1e-4, name


def test_fused_mamba2_mixer_gradcheck():
    inputs = _mixer_inputs(1, 6, 8, 1, 2, 4, 3, True, torch.float64, seed=3)
    sizes = dict(d_inner=8, groups=1, state=2, head_dim=4, norm_group=4, eps=1e-5)
    leaves = [v.requires_grad_() for v in inputs.values()]
    assert torch.autograd.gradcheck(lambda *t: cpu_kernels.mamba2_mixer_cpu(*t, **sizes), leaves)


def _mamba2_mixer(seed=0):
    torch.manual_seed(seed)
    mixer = VLMambaMamba2Mixer(tiny_mamba2_config(), layer_idx=0)
    mixer.init_ssm_parameters()
    with torch.no_grad():  # away from the init's ones and zeros, so that every parameter matters
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.conv1d.bias.uniform_(-0.3, 0.3)
        mixer.D.uniform_(-1.0, 1.0)
    return mixer


def _spy_on_fused_mixer(monkeypatch, prefills_only=False):
    """Record the sequence length of every call of the fused mixer (with prefills_only: of cache prefills)."""
    calls = []
    original = cpu_kernels.mamba2_mixer_cpu

    def spy(*args, **kwargs):
        if not prefills_only or kwargs.get("return_final_state"):
            calls.append(args[0].shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr("vlm_mamba_hf.modeling_vlm_mamba.mamba2_mixer_cpu", spy)
    return calls


def test_mamba2_mixer_takes_the_fused_path_and_matches_the_unfused_one(monkeypatch):
    mixer = _mamba2_mixer()
    hidden = torch.randn(2, 19, mixer.hidden_size, generator=torch.Generator().manual_seed(1))
    results = []
    calls = _spy_on_fused_mixer(monkeypatch)
    for fused in (True, False):
        monkeypatch.setattr(type(mixer), "_can_fuse_on_cpu", lambda self, t, fused=fused: fused)
        leaf = hidden.clone().requires_grad_()
        out = mixer(leaf)
        params = [p for p in mixer.parameters()]
        results.append((out, torch.autograd.grad(out.square().sum(), [leaf, *params])))
    assert len(calls) == 1  # the fused run only
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert _rel(want, got) < 1e-4


def test_mamba2_mixer_leaves_the_fused_path_when_it_would_skip_something(monkeypatch):
    mixer = _mamba2_mixer()
    hidden = torch.randn(2, 7, mixer.hidden_size)
    calls = _spy_on_fused_mixer(monkeypatch)
    mixer(hidden)
    assert len(calls) == 1
    # A padding mask, a hooked norm, a clamped dt, half precision, kernels off: the unfused path.
    mixer(hidden, attention_mask=torch.tensor([[1] * 7, [1] * 5 + [0] * 2]))
    handle = mixer.norm.register_forward_hook(lambda *args: None)
    mixer(hidden)
    handle.remove()
    mixer.time_step_limit = (0.0, 0.5)
    mixer(hidden)
    mixer.time_step_limit = (0.0, float("inf"))
    mixer.to(torch.bfloat16)(hidden.bfloat16())
    mixer.float()
    cpu_kernels.set_cpu_kernels_enabled(False)
    mixer(hidden)
    assert len(calls) == 1


def _prefill_in_two_chunks(model, ids):
    with torch.no_grad():
        first = model(ids[:, :13], use_cache=True)
        second = model(ids[:, 13:], cache=first.cache, use_cache=True)
    cache = second.cache
    states = [
        (cache.get_conv_state(i).clone(), cache.get_recurrent_state(i).clone()) for i in range(len(cache))
    ]
    return torch.cat([first.logits, second.logits], 1), states


def test_cache_prefill_takes_the_fused_path_and_leaves_the_same_logits_and_states(monkeypatch):
    """Without gradients a prefill into a cache runs the fused mixer from the cache's states and fills it: the
    same logits and conv / SSM states as the unfused path, over two chunks (the second continues the first)."""
    torch.manual_seed(0)
    model = VLMambaForCausalLM(tiny_mamba2_config()).eval()
    ids = torch.randint(3, 90, (2, 30), generator=torch.Generator().manual_seed(2))
    calls = _spy_on_fused_mixer(monkeypatch, prefills_only=True)
    logits, states = _prefill_in_two_chunks(model, ids)
    layers = len(model.backbone.layers)
    assert calls == [13] * layers + [17] * layers
    monkeypatch.setattr(VLMambaMamba2Mixer, "_can_fuse_on_cpu", lambda self, t: False)
    ref_logits, ref_states = _prefill_in_two_chunks(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for (conv, ssm), (ref_conv, ref_ssm) in zip(states, ref_states):
        torch.testing.assert_close(conv, ref_conv, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ssm, ref_ssm, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    calls = _spy_on_fused_mixer(monkeypatch)
    model(ids, use_cache=True)  # gradients on: the unfused path, whose backward handles the cache's states
    assert calls == []
    with pytest.raises(RuntimeError, match="no backward pass"):
        mixer = model.backbone.layers[0].mixer
        cpu_kernels.mamba2_mixer_cpu(
            mixer.in_proj(torch.randn(1, 3, mixer.hidden_size)),
            mixer.conv1d.weight.squeeze(1),
            mixer.conv1d.bias,
            mixer.dt_bias,
            -torch.exp(mixer.A_log),
            mixer.D,
            mixer.norm.weight,
            d_inner=mixer.intermediate_size,
            groups=mixer.n_groups,
            state=mixer.ssm_state_size,
            head_dim=mixer.head_dim,
            norm_group=mixer.norm.group_size,
            eps=1e-5,
            return_final_state=True,
        )

"""CUDA kernel paths against the PyTorch path on the same weights (skipped without a CUDA device)."""

import pytest
import torch
from conftest import make_lively, tiny_text_config

from vlm_mamba_hf import VLMambaForCausalLM, ssm_ops
from vlm_mamba_hf.ssm_ops import selective_scan, selective_scan_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((ref.float() - other.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


@pytest.fixture
def kernels():
    available = ssm_ops.kernels_available()
    if not all(available.values()):
        pytest.skip(f"mamba-ssm / causal-conv1d kernels missing: {available}")
    yield
    ssm_ops.set_kernels_enabled(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_scan_matches_torch_scan_outputs_and_gradients(kernels, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, d, n, length = 2, 64, 16, 512
    u = torch.randn(b, d, length, device="cuda", generator=gen).to(dtype)
    delta = (torch.randn(b, d, length, device="cuda", generator=gen) * 0.5).to(dtype)
    A = -torch.exp(torch.randn(d, n, device="cuda", generator=gen))
    B = torch.randn(b, n, length, device="cuda", generator=gen).to(dtype)
    C = torch.randn(b, n, length, device="cuda", generator=gen).to(dtype)
    D = torch.randn(d, device="cuda", generator=gen)
    z = torch.randn(b, d, length, device="cuda", generator=gen).to(dtype)
    bias = torch.randn(d, device="cuda", generator=gen) * 0.1
    leaves = [t.requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias)]

    def run(fn):
        y, last = fn(*leaves, delta_softplus=True, return_final_state=True)
        grads = torch.autograd.grad(y.float().sum(), leaves)
        return y, last, grads

    y_k, last_k, g_k = run(selective_scan)
    y_t, last_t, g_t = run(selective_scan_torch)
    assert _rel_err(y_t, y_k) <= REL_TOL[dtype]
    assert _rel_err(last_t, last_k) <= REL_TOL[dtype]
    for a, b_ in zip(g_t, g_k):
        assert _rel_err(a, b_) <= REL_TOL[dtype] * 10


def test_model_logits_and_greedy_tokens_match_torch_path_fp32(kernels):
    torch.manual_seed(0)
    model = make_lively(VLMambaForCausalLM(tiny_text_config(hidden_size=64))).cuda()
    ids = torch.randint(3, 97, (2, 40), device="cuda")
    with torch.no_grad():
        with_kernels = model(ids).logits
        ssm_ops.set_kernels_enabled(False)
        without = model(ids).logits
        torch_tokens = model.generate(ids, max_new_tokens=20, do_sample=False)
        ssm_ops.set_kernels_enabled(True)
        kernel_tokens = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert _rel_err(without, with_kernels) <= 1e-4
    assert torch.equal(kernel_tokens, torch_tokens)


def _tiny_vlm(device: str = "cuda"):
    from vlm_mamba_hf import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaVisionConfig

    vision = VLMambaVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, state_size=4, use_cls_token=False
    )
    config = VLMambaConfig(
        vision_config=vision, text_config=tiny_text_config(hidden_size=64), image_token_id=3
    )
    torch.manual_seed(0)
    model = make_lively(VLMambaForConditionalGeneration(config)).to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (1, 4 + 28), generator=gen)
    ids[:, :4] = 3
    pixel_values = torch.randn(1, 3, 16, 16, generator=gen)
    inputs = {"input_ids": ids.to(device), "pixel_values": pixel_values.to(device)}
    return model, inputs


# A VLM, not a text-only model: PEFT refuses out_proj on configs whose model_type is "mamba".
@pytest.mark.parametrize("part", ["language_model", "vision_tower"])
@pytest.mark.parametrize("module", ["in_proj", "x_proj", "dt_proj", "out_proj"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_lora_delta_on_each_projection_takes_effect_under_kernels(kernels, module, part, mode):
    """Eval runs the unfused kernels; train would take the fused mamba_inner_fn without adapters, and must not
    with them (it reads the base weights directly and would skip the delta)."""
    from vlm_mamba_hf import modeling_vlm_mamba as modeling
    from vlm_mamba_hf.lora import apply_lora, default_lora_config

    model, inputs = _tiny_vlm()
    getattr(model, mode)()
    with torch.no_grad():
        base = model(**inputs).logits
    peft_model = apply_lora(model, default_lora_config(include_vision=True, model_config=model.config))
    getattr(peft_model, mode)()
    mixers = [m for name, m in peft_model.named_modules() if name.endswith(".mixer") and f".{part}." in name]
    assert mixers and not any(modeling._can_use_fused_inner(m) for m in mixers)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and f".{module}." in name and f".{part}." in name:
                param.normal_(std=0.5)
        adapted = peft_model(**inputs).logits
    assert (adapted - base).abs().max() > 1e-4


def test_bf16_model_logits_on_kernels_match_torch_path(kernels):
    torch.manual_seed(0)
    model = VLMambaForCausalLM(tiny_text_config(hidden_size=64)).cuda().to(torch.bfloat16).eval()
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.float32
    ids = torch.randint(3, 97, (2, 64), device="cuda")
    with torch.no_grad():
        with_kernels = model(ids).logits
        ssm_ops.set_kernels_enabled(False)
        without = model(ids).logits
    assert _rel_err(without, with_kernels) <= REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_inner_training_path_matches_torch_path_outputs_and_gradients(kernels, dtype, monkeypatch):
    from vlm_mamba_hf import modeling_vlm_mamba as modeling

    torch.manual_seed(0)
    model = VLMambaForCausalLM(tiny_text_config(hidden_size=64)).cuda().to(dtype).train()
    assert modeling._can_use_fused_inner(model.backbone.layers[0].mixer)
    calls = []
    real = modeling.mamba_inner
    monkeypatch.setattr(modeling, "mamba_inner", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, 97, (2, 256), device="cuda")

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        return logits, {n: p.grad for n, p in model.named_parameters()}

    fused_logits, fused_grads = logits_and_grads()
    assert len(calls) == model.config.num_hidden_layers
    ssm_ops.set_kernels_enabled(False)
    logits, grads = logits_and_grads()
    assert len(calls) == model.config.num_hidden_layers
    assert _rel_err(logits, fused_logits) <= REL_TOL[dtype]
    for name, grad in grads.items():
        assert _rel_err(grad, fused_grads[name]) <= REL_TOL[dtype] * 10, name


def _lively_text_model(kind: str):
    from test_mamba2 import tiny_mamba2_config

    torch.manual_seed(0)
    config = tiny_text_config(hidden_size=64) if kind == "mamba1" else tiny_mamba2_config()
    return make_lively(VLMambaForCausalLM(config)).cuda()


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_cuda_graph_greedy_decode_batch2_equals_eager_tokens(kernels, kind):
    model = _lively_text_model(kind)
    ids = torch.randint(
        3, 97, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)
    )
    kwargs = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16)
    eager = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        # transformers compiles the decode step with its default CompileConfig (mode="reduce-overhead").
        graphed = model.generate(ids, cache_implementation="static", **kwargs)
        again = model.generate(ids, cache_implementation="static", **kwargs)
    assert len(set(eager[0, -16:].tolist())) > 2
    assert torch.equal(graphed, eager)
    assert torch.equal(again, eager)


def test_cuda_graph_beam_decode_equals_eager_tokens(kernels):
    from test_state_cache import compile_decode_steps

    model = _lively_text_model("mamba1")
    ids = torch.randint(
        3, 97, (2, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)
    )
    kwargs = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, num_beams=3, num_return_sequences=2)
    eager = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    compile_decode_steps(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        graphed = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(graphed, eager)

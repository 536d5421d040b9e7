"""When the Mamba-1 text mixer may take mamba_ssm's fused `mamba_inner_fn`, and that the fused call is wired
right (on CPU its PyTorch reference runs in the kernel's place; the kernel itself is checked in test_gpu.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_text_config

from vlm_mamba_hf import VLMambaForCausalLM
from vlm_mamba_hf import modeling_vlm_mamba as modeling
from vlm_mamba_hf.lora import apply_lora

FP32_REL_TOL = 1e-5  # fused reference against the unfused path, fp32 logits
FP32_GRAD_REL_TOL = 1e-4


@pytest.fixture
def kernel_reported(monkeypatch):
    """Pretend `mamba_inner_fn` is importable for this device (CPU tensors still take the PyTorch reference)."""
    monkeypatch.setattr(modeling, "kernel_available", lambda name, device: name == "mamba_inner_fn")


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = modeling.mamba_inner

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "mamba_inner", spy)
    return calls


def _model() -> VLMambaForCausalLM:
    torch.manual_seed(0)
    return VLMambaForCausalLM(tiny_text_config(hidden_size=48))


def test_plain_training_mixer_uses_the_fused_kernel_when_it_is_available(kernel_reported):
    mixer = _model().train().backbone.layers[0].mixer
    assert modeling._can_use_fused_inner(mixer)


def test_fused_kernel_is_never_used_in_eval_or_without_the_kernel():
    model = _model().train()
    assert not modeling._can_use_fused_inner(model.backbone.layers[0].mixer)  # CPU: no kernel
    model.eval()
    assert not modeling._can_use_fused_inner(model.backbone.layers[0].mixer)


def test_eval_mixer_does_not_use_the_fused_kernel(kernel_reported):
    assert not modeling._can_use_fused_inner(_model().eval().backbone.layers[0].mixer)


def test_lora_wrapped_mixer_does_not_use_the_fused_kernel(kernel_reported):
    peft_model = apply_lora(_model())
    peft_model.train()
    mixers = [layer.mixer for layer in peft_model.base_model.model.backbone.layers]
    assert mixers and not any(modeling._can_use_fused_inner(m) for m in mixers)


@pytest.mark.parametrize("module", ["in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"])
def test_an_adapter_or_hook_on_any_bypassed_module_disables_the_fused_kernel(kernel_reported, module):
    mixer = _model().train().backbone.layers[0].mixer
    original = getattr(mixer, module)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    setattr(mixer, module, Wrapped(original))
    assert not modeling._can_use_fused_inner(mixer)
    setattr(mixer, module, original)
    handle = original.register_forward_hook(lambda *args: None)
    assert not modeling._can_use_fused_inner(mixer)
    handle.remove()
    assert modeling._can_use_fused_inner(mixer)


def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((ref - other).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def test_fused_call_gives_the_unfused_outputs_and_gradients(kernel_reported, fused_calls, monkeypatch):
    model = _model().train()
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_logits, fused_grads = loss_and_grads()
    assert len(fused_calls) == model.config.num_hidden_layers
    monkeypatch.setattr(modeling, "kernel_available", lambda name, device: False)
    logits, grads = loss_and_grads()
    assert len(fused_calls) == model.config.num_hidden_layers
    assert _rel_err(logits, fused_logits) <= FP32_REL_TOL
    for name, grad in grads.items():
        assert _rel_err(grad, fused_grads[name]) <= FP32_GRAD_REL_TOL, name


def test_padding_mask_or_cache_keeps_the_unfused_path(kernel_reported, fused_calls):
    model = _model().train()
    ids = torch.randint(3, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    model(ids, attention_mask=mask)
    model(ids, use_cache=True)
    assert fused_calls == []

"""The (b, d, l) projection layout used on the CUDA scan kernel gives the same model as the default layout.

On CPU the kernel's layout decision is forced on (`_kernel_layout`), so in_proj and dt_proj run as
`weight @ hidden^T` while everything else stays PyTorch; the outputs, gradients and cached decoding must equal
the default path. The kernel itself on that layout is checked in test_gpu.py.
"""

import pytest
import torch
from conftest import make_lively, tiny_text_config

from vlm_mamba_hf import (
    VLMambaConfig,
    VLMambaForCausalLM,
    VLMambaForConditionalGeneration,
    VLMambaVisionConfig,
)
from vlm_mamba_hf import modeling_vlm_mamba as modeling
from vlm_mamba_hf.lora import apply_lora, default_lora_config

REL_TOL = 1e-5


def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((ref - other).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def _force_layout(monkeypatch) -> list[str]:
    """Force the kernel layout; returns the list of projections (class names) that take it."""
    calls = []
    real = modeling._project_bdl
    monkeypatch.setattr(modeling, "_kernel_layout", lambda tensor: True)
    monkeypatch.setattr(
        modeling, "_project_bdl", lambda lin, h: calls.append(type(lin).__name__) or real(lin, h)
    )
    return calls


@pytest.fixture
def layout_calls(monkeypatch):
    return _force_layout(monkeypatch)


def _text_model(**overrides) -> VLMambaForCausalLM:
    torch.manual_seed(0)
    return make_lively(VLMambaForCausalLM(tiny_text_config(hidden_size=48, **overrides)))


def _forward_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("use_bias", [False, True])
def test_text_mixer_kernel_layout_gives_the_same_logits_and_gradients(use_bias, monkeypatch):
    model = _text_model(use_bias=use_bias)
    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding takes the masked path
    ref_logits, ref_grads = _forward_and_grads(model, input_ids=ids, attention_mask=mask)

    calls = _force_layout(monkeypatch)
    logits, grads = _forward_and_grads(model, input_ids=ids, attention_mask=mask)

    layers = model.config.num_hidden_layers
    assert calls.count("Linear") == layers and calls.count("VLMambaDeltaProjection") == layers
    assert _rel_err(ref_logits, logits) <= REL_TOL
    assert ref_grads.keys() == grads.keys()
    for name, grad in ref_grads.items():
        assert _rel_err(grad, grads[name]) <= 1e-4, name


def test_cached_generation_in_kernel_layout_equals_recompute(layout_calls):
    """The prefill fills the cache from the (b, d, l) projections; decoding from it must match recomputing."""
    model = _text_model().eval()
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_layout = model.generate(ids, **kwargs)
    assert layout_calls  # the prefill took the layout
    recompute = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(with_layout, recompute)


def test_adapter_wrapped_projection_is_called_as_a_module(layout_calls):
    """LoRA on in_proj / dt_proj: the layout shortcut would read the base weight alone, so it must not apply."""
    model = _text_model()
    peft_model = apply_lora(model, default_lora_config(model_config=model.config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    assert layout_calls == []
    with peft_model.disable_adapter(), torch.no_grad():
        base = peft_model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3


def test_bidirectional_vision_mixer_kernel_layout_matches(monkeypatch):
    vision = VLMambaVisionConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, state_size=4, use_cls_token=False
    )
    config = VLMambaConfig(
        vision_config=vision, text_config=tiny_text_config(hidden_size=32), image_token_id=3
    )
    torch.manual_seed(0)
    tower = make_lively(VLMambaForConditionalGeneration(config)).model.vision_tower
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = tower(pixels).last_hidden_state
    calls = _force_layout(monkeypatch)
    assert _rel_err(ref, tower(pixels).last_hidden_state) <= REL_TOL
    assert len(calls) == 2 * 3  # per layer: in_proj, and dt_proj of each direction

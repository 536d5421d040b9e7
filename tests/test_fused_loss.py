"""The fused LM-head + cross-entropy training loss against transformers' ForCausalLMLoss on full logits."""

import pytest
import torch
from conftest import make_lively, tiny_text_config
from peft import LoraConfig, get_peft_model
from transformers.loss.loss_utils import ForCausalLMLoss

from vlm_mamba_hf import VLMambaConfig, VLMambaForCausalLM, VLMambaForConditionalGeneration, fused_loss
from vlm_mamba_hf.configuration_vlm_mamba import VLMambaVisionConfig
from vlm_mamba_hf.fused_loss import fused_causal_lm_loss

IMAGE_TOKEN_ID = 5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1e-12)).item()


def _labels(b, length, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (b, length), generator=gen)
    labels[0, :3] = -100  # a prompt
    labels[1, -4:] = -100  # padding
    return labels


@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
@pytest.mark.parametrize("chunk_elements", [1 << 22, 300])  # one chunk; many chunks of a few rows
def test_fused_loss_and_gradients_equal_full_logits(monkeypatch, num_items, chunk_elements):
    monkeypatch.setattr(fused_loss, "_CHUNK_ELEMENTS", chunk_elements)
    b, length, d, vocab = 2, 13, 16, 50
    hidden = torch.randn(b, length, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    labels = _labels(b, length, vocab)
    n = torch.tensor(17) if num_items == "tensor" else num_items

    ref = ForCausalLMLoss((hidden @ weight.t()).float(), labels, vocab, num_items_in_batch=n)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    ours = fused_causal_lm_loss(hidden, weight, labels, n)
    our_grads = torch.autograd.grad(ours, (hidden, weight))

    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for r, o in zip(ref_grads, our_grads):
        assert _rel(r, o) <= 1e-5


def test_fused_loss_in_bfloat16_matches_full_logits_within_bf16_rounding():
    hidden = torch.randn(2, 9, 16).bfloat16().requires_grad_()
    weight = torch.randn(40, 16).bfloat16().requires_grad_()
    labels = _labels(2, 9, 40)
    ref = ForCausalLMLoss((hidden @ weight.t()).float(), labels, 40)
    ours = fused_causal_lm_loss(hidden, weight, labels)
    (ours * 3).backward()
    assert abs(ours.item() - ref.item()) <= 2e-2 * abs(ref.item())
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_fused_loss_under_bf16_autocast_projects_in_bf16_and_keeps_fp32_gradients():
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = _labels(2, 9, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ForCausalLMLoss((hidden @ weight.t()).float(), labels, 40)
        ours = fused_causal_lm_loss(hidden, weight, labels)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    our_grads = torch.autograd.grad(ours, (hidden, weight))
    assert abs(ours.item() - ref.item()) <= 1e-3 * abs(ref.item())
    for r, o in zip(ref_grads, our_grads):
        assert o.dtype == torch.float32 and _rel(r, o) <= 2e-2


def test_fused_loss_rejects_out_of_range_labels_and_mismatched_shapes():
    hidden, weight = torch.randn(1, 4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"token ids in \[0, 10\)"):
        fused_causal_lm_loss(hidden, weight, torch.tensor([[1, 2, 10, 3]]))
    with pytest.raises(ValueError, match="do not match"):
        fused_causal_lm_loss(hidden, weight, torch.tensor([[1, 2, 3]]))
    # No target at all: NaN, as transformers' mean over no tokens.
    assert torch.isnan(fused_causal_lm_loss(hidden, weight, torch.full((1, 4), -100)))


def _grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training_step(model, **inputs):
    model.train()
    fused_out, fused_grads = _grads(model, **inputs)
    model.fused_cross_entropy = False
    full_out, full_grads = _grads(model, **inputs)
    model.fused_cross_entropy = True
    assert fused_out.logits is None and full_out.logits is not None
    assert abs(fused_out.loss.item() - full_out.loss.item()) <= 1e-5 * abs(full_out.loss.item())
    assert fused_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert _rel(grad, fused_grads[name]) <= 1e-4, name
    # Eval mode always returns logits.
    model.eval()
    with torch.no_grad():
        assert model(**inputs).logits is not None


def test_text_model_training_step_is_unchanged_by_the_fused_loss():
    model = make_lively(VLMambaForCausalLM(tiny_text_config()))
    input_ids = torch.randint(3, 97, (2, 11))
    labels = input_ids.clone()
    labels[1, :4] = -100
    _assert_same_training_step(model, input_ids=input_ids, labels=labels, num_items_in_batch=15)


def _vlm() -> VLMambaForConditionalGeneration:
    config = VLMambaConfig(
        vision_config=VLMambaVisionConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            state_size=4,
            use_cls_token=False,
        ),
        text_config=tiny_text_config(),
        vision_mode="encoder",
        image_token_id=IMAGE_TOKEN_ID,
    )
    return make_lively(VLMambaForConditionalGeneration(config))


def test_vlm_training_step_is_unchanged_by_the_fused_loss():
    model = _vlm()
    text = torch.randint(6, 97, (2, 7))
    input_ids = torch.cat([torch.full((2, 4), IMAGE_TOKEN_ID), text], dim=1)
    labels = input_ids.clone()
    labels[:, :6] = -100  # image and prompt
    pixel_values = torch.randn(2, 3, 16, 16)
    _assert_same_training_step(model, input_ids=input_ids, labels=labels, pixel_values=pixel_values)


def test_an_adapter_on_the_lm_head_is_never_bypassed():
    model = _vlm()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    peft_model.train()
    input_ids = torch.cat([torch.full((1, 4), IMAGE_TOKEN_ID), torch.randint(6, 97, (1, 6))], dim=1)
    labels = input_ids.clone()
    labels[:, :4] = -100
    pixel_values = torch.randn(1, 3, 16, 16)
    out = peft_model(input_ids=input_ids, labels=labels, pixel_values=pixel_values)
    # The wrapped head takes the unfused path: logits exist and the loss is theirs.
    assert out.logits is not None
    expected = ForCausalLMLoss(out.logits, labels, out.logits.shape[-1])
    assert torch.allclose(out.loss, expected, rtol=1e-6)
    with peft_model.disable_adapter():
        plain = peft_model(input_ids=input_ids, labels=labels, pixel_values=pixel_values)
    assert not torch.allclose(out.loss, plain.loss)


def test_a_head_weight_gathered_only_inside_its_forward_keeps_the_unfused_path():
    """DeepSpeed ZeRO-3 marks partitioned parameters with `ds_id` and gathers them only in the module's forward:
    reading `lm_head.weight` from outside would see an empty shard."""
    model = make_lively(VLMambaForCausalLM(tiny_text_config())).train()
    input_ids = torch.randint(3, 97, (1, 6))
    assert model(input_ids=input_ids, labels=input_ids).logits is None
    model.lm_head.weight.ds_id = 0
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits is not None
    del model.lm_head.weight.ds_id
    fused = model(input_ids=input_ids, labels=input_ids.int())  # int32 labels are accepted too
    assert fused.logits is None and torch.allclose(fused.loss, out.loss, rtol=1e-5)

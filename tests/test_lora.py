"""LoRA through PEFT: what trains, adapter save/reload, merging, wrong base models, no path bypasses adapters."""

import pytest
import torch
from conftest import make_lively, tiny_text_config
from peft import PeftModel
from safetensors import safe_open
from transformers import Mamba2Config

from vlm_mamba_hf import (
    LoRAConfig,
    VLMamba,
    VLMambaConfig,
    VLMambaForCausalLM,
    VLMambaForConditionalGeneration,
    VLMambaVisionConfig,
)
from vlm_mamba_hf.lora import (
    apply_lora,
    default_lora_config,
    default_target_modules,
    load_lora_adapter,
    merge_lora,
)

IMAGE_TOKEN_ID = 4
N_IMAGE_TOKENS = 4  # 16 px / patch 8 -> 2 x 2 patches
SSM_LAYERS = ("mamba1", "mamba2")
# The projections a default LoRA config adapts in each mixer kind (every nn.Linear of the mixer).
ADAPTED = {"mamba1": {"in_proj", "x_proj", "dt_proj", "out_proj"}, "mamba2": {"in_proj", "out_proj"}}


def _text_config(hidden_size: int, num_hidden_layers: int, ssm_layer: str):
    if ssm_layer == "mamba2":
        return Mamba2Config(
            vocab_size=97,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            state_size=8,
            head_dim=16,
            num_heads=2 * hidden_size // 16,
            n_groups=1,
            chunk_size=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    return tiny_text_config(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)


def _config(
    hidden_size=32, num_hidden_layers=2, vision_mode="encoder", ssm_layer="mamba1", vision_ssm_layer=None
) -> VLMambaConfig:
    return VLMambaConfig(
        vision_config=VLMambaVisionConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            state_size=4,
            use_cls_token=False,
            ssm_layer=vision_ssm_layer or ssm_layer,
            head_dim=16,
        ),
        text_config=_text_config(hidden_size, num_hidden_layers, ssm_layer),
        vision_mode=vision_mode,
        image_token_id=IMAGE_TOKEN_ID,
    )


def _base(seed=0, **kwargs) -> VLMambaForConditionalGeneration:
    torch.manual_seed(seed)
    return make_lively(VLMambaForConditionalGeneration(_config(**kwargs)), seed=seed)


def _inputs(batch=2, text=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 97, (batch, N_IMAGE_TOKENS + text), generator=gen)
    ids[:, :N_IMAGE_TOKENS] = IMAGE_TOKEN_ID
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}


def _randomise_adapters(model, seed=0, scale=0.5):
    """Fresh LoRA has lora_B = 0 (a no-op); give every adapter matrix a nonzero value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model


def _lora_model(seed=0, scale=0.5, **config_kwargs):
    return _randomise_adapters(apply_lora(_base(**config_kwargs)), seed, scale)


def _adapted_projections(model, part: str = "language_model") -> set[str]:
    """Names (in_proj, ...) of the mixer modules under `part` (language_model, backbone, vision_tower) with LoRA."""
    return {
        name.split(".mixer.")[1].split(".")[0]
        for name, _ in model.named_parameters()
        if f"{part}.layers." in name and ".lora_A." in name
    }


def _mixer_linears(model, part: str) -> set[str]:
    """Names of every nn.Linear inside the mixers under `part`."""
    return {
        name.split(".mixer.")[1]
        for name, module in model.named_modules()
        if f"{part}.layers." in name and ".mixer." in name and isinstance(module, torch.nn.Linear)
    }


@pytest.mark.parametrize("ssm_layer", SSM_LAYERS)
def test_only_adapters_and_saved_modules_train(ssm_layer):
    model = apply_lora(_base(ssm_layer=ssm_layer))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert "lora_A" in name or "lora_B" in name or "multi_modal_projector.modules_to_save" in name, name
    assert _adapted_projections(model) == ADAPTED[ssm_layer]
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    # A backward pass leaves frozen weights without gradients.
    out = model(**_inputs(), labels=_inputs()["input_ids"])
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name


@pytest.mark.parametrize("ssm_layer", SSM_LAYERS)
def test_adapter_saves_as_safetensors_and_reloads_to_identical_logits(tmp_path, ssm_layer):
    model = _lora_model(ssm_layer=ssm_layer).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all("lora_" in k or "multi_modal_projector" in k for k in keys)
    # Reloaded for training (adapters require grad, as in `model`): bit-identical logits.
    reloaded = load_lora_adapter(_base(ssm_layer=ssm_layer), tmp_path, is_trainable=True).eval()
    assert isinstance(reloaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=0, rtol=0)
    # Reloaded for inference (frozen adapters): the same up to fp32 rounding.
    frozen = load_lora_adapter(_base(ssm_layer=ssm_layer), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(**inputs).logits, expected, atol=1e-4, rtol=1e-5)


def test_adapter_for_another_base_model_is_refused_with_the_mismatch(tmp_path):
    _lora_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"different base model(.|\n)*in_features 32, model 48"):
        load_lora_adapter(_base(hidden_size=48), tmp_path)
    # Same widths, more layers: layers 2-3 would silently run without their adapter.
    with pytest.raises(ValueError, match=r"layers\.3\.mixer\.in_proj: a target module .* no weights"):
        load_lora_adapter(_base(num_hidden_layers=4), tmp_path)


@pytest.mark.parametrize("ssm_layer", SSM_LAYERS)
def test_merge_and_unload_matches_the_adapted_model(ssm_layer):
    model = _lora_model(scale=0.1, ssm_layer=ssm_layer).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        merged = merge_lora(model)
        assert isinstance(merged, VLMambaForConditionalGeneration)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "vision_mode, ssm_layer",
    [("encoder", "mamba1"), ("fuyu", "mamba1"), ("encoder", "mamba2"), ("fuyu", "mamba2")],
)
def test_adapter_changes_the_output_on_every_compute_path(vision_mode, ssm_layer):
    """Full forward, prefill + cached one-token decode, and generate(): the adapter is never bypassed."""
    model = _lora_model(vision_mode=vision_mode, ssm_layer=ssm_layer).eval()
    assert model.base_model.model.config.vision_mode == vision_mode
    assert model.base_model.model.config.text_config.model_type == (
        "mamba2" if ssm_layer == "mamba2" else "mamba"
    )
    inputs = _inputs(batch=1)
    with torch.no_grad():
        with_lora = model(**inputs).logits
        with model.disable_adapter():
            without = model(**inputs).logits
        assert (with_lora - without).abs().max() > 1e-3

        # Cached decode: prefill, then one token at a time through the recurrent step.
        prefill = model(**inputs, use_cache=True)
        next_token = prefill.logits[:, -1:].argmax(-1)
        step = model(input_ids=next_token, cache=prefill.cache, use_cache=True).logits[:, -1]
        full_ids = torch.cat([inputs["input_ids"], next_token], dim=1)
        recompute = model(input_ids=full_ids, pixel_values=inputs["pixel_values"]).logits[:, -1]
        torch.testing.assert_close(step, recompute, atol=1e-4, rtol=1e-4)
        with model.disable_adapter():
            base_prefill = model(**inputs, use_cache=True)
            base_step = model(input_ids=next_token, cache=base_prefill.cache, use_cache=True).logits[:, -1]
        assert (step - base_step).abs().max() > 1e-3

        generated = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        with model.disable_adapter():
            base_generated = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
    for scores, base_scores in zip(generated.scores, base_generated.scores):
        assert (scores - base_scores).abs().max() > 1e-3


@pytest.mark.parametrize("ssm_layer", SSM_LAYERS)
def test_seed_style_lora_config_trains_only_adapters(ssm_layer):
    config = _config(ssm_layer=ssm_layer)
    config.lora = LoRAConfig(rank=4, alpha=8)
    model = VLMamba(config)
    assert isinstance(model.hf_model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


# --- default targets follow the mixer kind ----------------------------------------------------------------


@pytest.mark.parametrize("text_layer", SSM_LAYERS)
@pytest.mark.parametrize("vision_layer", SSM_LAYERS)
def test_default_targets_are_every_mixer_projection_of_each_side(text_layer, vision_layer):
    base = _base(ssm_layer=text_layer, vision_ssm_layer=vision_layer)
    text_linears, vision_linears = (
        _mixer_linears(base, "language_model"),
        _mixer_linears(base, "vision_tower"),
    )
    config = default_lora_config(include_vision=True, model_config=base.config)
    model = apply_lora(base, config)
    assert _adapted_projections(model, "language_model") == text_linears == ADAPTED[text_layer]
    assert _adapted_projections(model, "vision_tower") == vision_linears
    assert ("x_proj_b" in vision_linears) == (vision_layer == "mamba1")


def test_vision_adapter_changes_the_output_of_a_mamba2_tower():
    base = _base(ssm_layer="mamba2")
    model = apply_lora(base, default_lora_config(include_vision=True, model_config=base.config)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and "vision_tower" in name:  # text adapters stay a no-op (lora_B = 0)
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        inputs = _inputs(batch=1)
        with_lora = model(**inputs).logits
        with model.disable_adapter():
            without = model(**inputs).logits
    assert (with_lora - without).abs().max() > 1e-3


@pytest.mark.parametrize("ssm_layer", SSM_LAYERS)
def test_text_only_model_gets_a_default_config_that_peft_accepts(ssm_layer):
    # PEFT refuses out_proj on configs whose model_type is "mamba"/"mamba2", which a text-only model carries.
    torch.manual_seed(0)
    base = make_lively(VLMambaForCausalLM(_text_config(32, 2, ssm_layer)))
    model = _randomise_adapters(apply_lora(base)).eval()
    assert _adapted_projections(model, "backbone") == ADAPTED[ssm_layer] - {"out_proj"}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(5, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_lora = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert (with_lora - without).abs().max() > 1e-3


def test_default_config_without_the_model_config_still_fits_a_mamba2_model():
    # What compat.VLMamba builds: no model config, Mamba-1 names; a Mamba-2 model keeps the two it has.
    assert "x_proj" in default_target_modules()
    model = apply_lora(_base(ssm_layer="mamba2"), default_lora_config())
    assert _adapted_projections(model) == ADAPTED["mamba2"]

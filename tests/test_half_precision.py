"""Half precision: A_log, D and the dt bias stay fp32 (cast, load, PEFT), and bf16 models compute correctly
on the PyTorch path (forward, backward, generate) with them."""

import pytest
import torch
from conftest import make_lively, tiny_text_config
from test_mamba2 import tiny_mamba2_config, tiny_mamba2_vision_config
from test_vlm import tiny_vision_config, tiny_vlm_config

from vlm_mamba_hf import VLMambaForCausalLM, VLMambaForConditionalGeneration
from vlm_mamba_hf.lora import apply_lora
from vlm_mamba_hf.tokenizer_utils import build_tokenizer

BF16_REL_TOL = 2e-2  # logits of the bf16 model against the fp32 model with the same weights
SSM_FP32_SUFFIXES = (
    "A_log",
    "A_b_log",
    ".D",
    ".D_b",
    "dt_proj.bias",
    "dt_proj_b.bias",
    "dt_bias",
    "dt_bias_b",
)


def _is_ssm_parameter(name: str) -> bool:
    return name.endswith(SSM_FP32_SUFFIXES)


def _tokenizer():
    return build_tokenizer(["a red circle what color is the shape"] * 20, vocab_size=300)


def _build(kind: str):
    """(model, inputs) for one family, built in fp32 with the default initialisation."""
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    if kind == "mamba1":
        return VLMambaForCausalLM(tiny_text_config()), {"input_ids": ids}
    if kind == "mamba2":
        return VLMambaForCausalLM(tiny_mamba2_config()), {"input_ids": ids}
    tokenizer = _tokenizer()
    vision = tiny_vision_config() if kind == "vlm" else tiny_mamba2_vision_config()
    model = VLMambaForConditionalGeneration(tiny_vlm_config(tokenizer, vision_config=vision))
    n = model.config.num_image_tokens
    text = torch.randint(max(tokenizer.all_special_ids) + 1, len(tokenizer), (2, 12))
    image = torch.full((2, n), model.config.image_token_id)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model, {"input_ids": torch.cat([image, text], 1), "pixel_values": pixels}


KINDS = ["mamba1", "mamba2", "vlm", "vlm_mamba2_tower"]


def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((ref.float() - other.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_ssm_parameters_stay_fp32_when_the_model_is_cast_to_half(kind, cast):
    model, _ = _build(kind)
    expected = {name: p.detach().clone() for name, p in model.named_parameters() if _is_ssm_parameter(name)}
    assert expected
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    model = model.to(torch.bfloat16) if cast == "to" else getattr(model, cast)()
    for name, param in model.named_parameters():
        if _is_ssm_parameter(name):
            assert param.dtype == torch.float32, name
            assert torch.equal(param, expected[name]), name  # never rounded on the way
        elif param.is_floating_point():
            assert param.dtype == dtype, name


def test_casting_back_to_fp32_and_moving_devices_still_apply_to_ssm_parameters():
    model, _ = _build("mamba1")
    model.to(torch.bfloat16).to(torch.float64)
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.float64
    model.to(torch.float32).to("meta")
    assert model.backbone.layers[0].mixer.A_log.device.type == "meta"


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "vlm"])
def test_loading_with_dtype_bfloat16_keeps_ssm_parameters_fp32(kind, tmp_path):
    model, _ = _build(kind)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    state = model.state_dict()
    for name, param in loaded.named_parameters():
        if _is_ssm_parameter(name):
            assert param.dtype == torch.float32, name
            torch.testing.assert_close(param, state[name], rtol=0, atol=0, msg=name)
        elif param.is_floating_point():
            assert param.dtype == torch.bfloat16, name


def test_random_init_in_bfloat16_has_fp32_ssm_parameters_with_mamba_init():
    model = VLMambaForCausalLM._from_config(tiny_text_config(), dtype=torch.bfloat16)
    mixer = model.backbone.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_proj.bias.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    expected = torch.log(torch.arange(1, mixer.ssm_state_size + 1, dtype=torch.float32))
    torch.testing.assert_close(mixer.A_log[0], expected, rtol=0, atol=0)


def test_lora_on_a_bfloat16_model_keeps_dt_bias_fp32_and_takes_effect():
    model, inputs = _build("mamba1")
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        base = model(**inputs).logits
    peft_model = apply_lora(model)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and ".dt_proj." in name:
                param.normal_(std=0.5)
        adapted = peft_model(**inputs).logits
    dt_proj = peft_model.base_model.model.backbone.layers[0].mixer.dt_proj
    assert dt_proj.get_base_layer().bias.dtype == torch.float32
    assert (adapted - base).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_logits_are_within_tolerance_of_fp32(kind):
    model, inputs = _build(kind)
    model.eval()
    with torch.no_grad():
        reference = model(**inputs).logits
        half = model.to(torch.bfloat16)(**inputs).logits
    assert torch.isfinite(half).all()
    assert _rel_err(reference, half) <= BF16_REL_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_backward_gives_finite_gradients_in_each_parameters_dtype(kind):
    model, inputs = _build(kind)
    model = model.to(torch.bfloat16).train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.dtype == param.dtype, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "vlm"])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_bfloat16_cached_generation_matches_bfloat16_recompute(kind, cache_implementation):
    model, inputs = _build(kind)
    model = make_lively(model).to(torch.bfloat16)
    kwargs = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)
    cached = model.generate(**inputs, cache_implementation=cache_implementation, **kwargs)
    recomputed = model.generate(**inputs, use_cache=False, **kwargs)
    assert len(set(cached[0, -6:].tolist())) > 2
    assert torch.equal(cached, recomputed)

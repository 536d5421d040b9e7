"""Mamba-2 (SSD) language model against transformers' Mamba2ForCausalLM; generation on the cache; vision."""

import pytest
import torch
from conftest import make_lively, tiny_mamba2_config, tiny_text_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file
from transformers import Mamba2Config, Mamba2ForCausalLM

from vlm_mamba_hf import (
    VLMambaConfig,
    VLMambaForCausalLM,
    VLMambaForConditionalGeneration,
    VLMambaVisionConfig,
    VLMambaVisionModel,
)
from vlm_mamba_hf.modeling_vlm_mamba import VLMambaBiMamba2Mixer, VLMambaMamba2Mixer

LOGITS_ATOL_FP32 = 1e-4
GRAD_REL_TOL_FP32 = 1e-4
VOCAB = 97


def tiny_mamba2_vision_config(**overrides) -> VLMambaVisionConfig:
    kwargs = dict(
        image_size=32,
        patch_size=8,
        hidden_size=24,
        num_hidden_layers=2,
        state_size=4,
        ssm_layer="mamba2",
        head_dim=12,
        chunk_size=8,
    )
    kwargs.update(overrides)
    return VLMambaVisionConfig(**kwargs)


@pytest.fixture(scope="module")
def saved_reference(tmp_path_factory):
    """A folder written by transformers' own Mamba2ForCausalLM.save_pretrained, and that model."""
    torch.manual_seed(0)
    reference = make_lively(Mamba2ForCausalLM(tiny_mamba2_config()))
    folder = tmp_path_factory.mktemp("mamba2_ref")
    reference.save_pretrained(folder)
    return folder, reference


@pytest.fixture(scope="module")
def loaded(saved_reference):
    folder, _ = saved_reference
    model, info = VLMambaForCausalLM.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def test_transformers_mamba2_checkpoint_loads_without_missing_or_unexpected_keys(loaded):
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert isinstance(model.config, Mamba2Config)
    assert isinstance(model.backbone.layers[0].mixer, VLMambaMamba2Mixer)


def test_from_pretrained_never_overwrites_loaded_weights(saved_reference):
    folder, _ = saved_reference
    weights = load_file(folder / "model.safetensors")
    state = VLMambaForCausalLM.from_pretrained(folder).state_dict()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def test_config_overrides_apply_when_loading_a_mamba2_folder(saved_reference):
    folder, _ = saved_reference
    model = VLMambaForCausalLM.from_pretrained(folder, chunk_size=4)
    assert isinstance(model.config, Mamba2Config) and model.config.chunk_size == 4
    assert model.backbone.layers[0].mixer.chunk_size == 4


@pytest.mark.parametrize("length", [1, 7, 64, 257])
def test_logits_match_transformers_mamba2(saved_reference, loaded, length):
    _, reference = saved_reference
    model, _ = loaded
    input_ids = torch.randint(3, VOCAB, (2, length))
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = model(input_ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= LOGITS_ATOL_FP32


def test_training_gradients_match_transformers_mamba2(saved_reference, loaded):
    _, reference = saved_reference
    model, _ = loaded
    ids = torch.randint(3, VOCAB, (2, 40))
    reference.zero_grad()
    model.zero_grad()
    reference(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        g_ref, g = expected[name].grad, param.grad
        err = ((g_ref - g).abs().max() / g_ref.abs().max().clamp(min=1e-12)).item()
        assert err <= GRAD_REL_TOL_FP32, name
    reference.zero_grad()
    model.zero_grad()


def test_greedy_generate_matches_transformers_mamba2(saved_reference, loaded):
    _, reference = saved_reference
    model, _ = loaded
    input_ids = torch.randint(3, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=15, min_new_tokens=15, do_sample=False)
    expected = reference.generate(input_ids, **kwargs)
    got = model.generate(input_ids, **kwargs)
    assert len(set(got[0, 5:].tolist())) > 3, "degenerate output would not test the cache"
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "mode",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=0, temperature=1.0),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
    ],
    ids=["greedy", "sampling", "beam"],
)
def test_cached_generation_matches_recompute(loaded, mode):
    model, _ = loaded
    input_ids = torch.randint(3, VOCAB, (2, 6))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, **mode)
    torch.manual_seed(123)
    cached = model.generate(input_ids, use_cache=True, **kwargs)
    torch.manual_seed(123)
    recomputed = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


def test_left_padded_row_generates_what_it_generates_alone(loaded):
    model, _ = loaded
    long_prompt = torch.randint(3, VOCAB, (1, 9))
    short_prompt = torch.randint(3, VOCAB, (1, 4))
    pad = model.config.pad_token_id
    batch = torch.cat([long_prompt, torch.cat([torch.full((1, 5), pad), short_prompt], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=pad)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    alone_long = model.generate(long_prompt, **kwargs)
    alone_short = model.generate(short_prompt, **kwargs)
    assert torch.equal(together[0, 9:], alone_long[0, 9:])
    assert torch.equal(together[1, 9:], alone_short[0, 4:])


def test_prefill_in_two_chunks_with_cache_equals_one_pass(loaded):
    model, _ = loaded
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :23], use_cache=True)
        second = model(ids[:, 23:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_cache_holds_transformers_mamba2_state_shapes(loaded):
    model, _ = loaded
    out = model(torch.randint(3, VOCAB, (2, 5)), use_cache=True)
    config = model.config
    conv_dim = config.expand * config.hidden_size + 2 * config.n_groups * config.state_size
    assert out.cache.get_conv_state(0).shape == (2, conv_dim, config.conv_kernel)
    assert out.cache.get_recurrent_state(0).shape == (2, config.num_heads, config.head_dim, config.state_size)


def test_state_dict_round_trips_with_transformers(loaded):
    model, _ = loaded
    reference = Mamba2ForCausalLM(model.config).eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, VOCAB, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_fresh_model_has_mamba2_init():
    config = tiny_mamba2_config(time_step_min=0.001, time_step_max=0.1)
    mixer = VLMambaForCausalLM(config).backbone.layers[0].mixer
    A = torch.exp(mixer.A_log.data)
    assert mixer.A_log.shape == (config.num_heads,) and A.min() >= 1 and A.max() <= 16
    torch.testing.assert_close(mixer.D.data, torch.ones_like(mixer.D))
    dt = torch.nn.functional.softplus(mixer.dt_bias.data)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    torch.testing.assert_close(mixer.norm.weight.data, torch.ones_like(mixer.norm.weight))


def test_mamba1_config_still_builds_mamba1_mixers():
    model = VLMambaForCausalLM(tiny_text_config())
    assert not isinstance(model.backbone.layers[0].mixer, VLMambaMamba2Mixer)


# --- vision tower ------------------------------------------------------------------------------------------


def test_mamba2_vision_tower_is_bidirectional():
    torch.manual_seed(0)
    tower = make_lively(VLMambaVisionModel(tiny_mamba2_vision_config(use_cls_token=False)))
    mixer = tower.layers[0].mixer
    assert isinstance(mixer, VLMambaBiMamba2Mixer)
    names = {name for name, _ in mixer.named_parameters()}
    assert {"conv1d_b.weight", "dt_bias_b", "A_b_log", "D_b", "in_proj.weight", "out_proj.weight"} <= names
    pixels = torch.randn(1, 3, 32, 32)
    changed = pixels.clone()
    changed[..., 24:, 24:] += 5.0  # only the last patch (row-major order)
    with torch.no_grad():
        before = tower(pixels).last_hidden_state
        after = tower(changed).last_hidden_state
    # A causal scan leaves the first position bit-for-bit unchanged; the effect decays over 15 patches.
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-6, "the first patch must see the last one"


def test_vlm_with_mamba2_tower_and_language_model_generates_with_cache():
    torch.manual_seed(0)
    config = VLMambaConfig(
        vision_config=tiny_mamba2_vision_config(),
        text_config=tiny_mamba2_config(vocab_size=120),
        image_token_id=5,
    )
    model = make_lively(VLMambaForConditionalGeneration(config))
    assert isinstance(model.language_model.layers[0].mixer, VLMambaMamba2Mixer)
    ids = torch.cat([torch.full((1, config.num_image_tokens), 5), torch.randint(6, 120, (1, 4))], 1)
    pixels = torch.randn(1, 3, 32, 32)
    kwargs = dict(pixel_values=pixels, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = model.generate(ids, use_cache=True, **kwargs)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(n_groups=3), "n_groups"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(head_dim=0), "head_dim"),
        (dict(num_heads=4), "num_heads"),
    ],
)
def test_invalid_mamba2_text_config_fails_naming_the_field(overrides, field):
    config = tiny_mamba2_config()
    for key, value in overrides.items():
        setattr(config, key, value)  # bypass Mamba2Config's own check to reach ours
    with pytest.raises(ValueError, match=field):
        VLMambaForCausalLM(config)
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=field):
        VLMambaConfig(vision_config=tiny_mamba2_vision_config(), text_config=config, image_token_id=5)


def test_head_dim_not_dividing_inner_size_fails_at_config_time():
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="head_dim"):
        tiny_mamba2_config(head_dim=5, num_heads=12)


@pytest.mark.parametrize(
    "overrides,field",
    [(dict(head_dim=7), "head_dim"), (dict(n_groups=3), "n_groups"), (dict(chunk_size=0), "chunk_size")],
)
def test_invalid_mamba2_vision_config_fails_at_config_time_naming_the_field(overrides, field):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=field):
        tiny_mamba2_vision_config(**overrides)


# --- vision Mamba-2 time_step_limit ------------------------------------------------------------------------

# What VLMambaMamba2Mixer (and its block) read from the config it is built from.
MIXER_FIELDS = (
    "hidden_size",
    "expand",
    "head_dim",
    "n_groups",
    "state_size",
    "chunk_size",
    "conv_kernel",
    "hidden_act",
    "use_bias",
    "use_conv_bias",
    "layer_norm_epsilon",
    "residual_in_fp32",
    "time_step_min",
    "time_step_max",
    "time_step_floor",
    "time_step_limit",
)


def test_mamba2_vision_config_has_every_field_the_mixer_reads_with_mamba2_defaults():
    vision = VLMambaVisionConfig(ssm_layer="mamba2")
    text = Mamba2Config()
    missing = [name for name in MIXER_FIELDS if name not in vision.to_dict()]
    assert not missing
    for name in ("time_step_min", "time_step_max", "time_step_floor", "conv_kernel"):
        assert getattr(vision, name) == getattr(text, name), name
    assert vision.time_step_limit == tuple(text.time_step_limit) == (0.0, float("inf"))


def test_vision_time_step_limit_reaches_the_mixer_and_clamps_dt():
    torch.manual_seed(0)
    free = make_lively(VLMambaVisionModel(tiny_mamba2_vision_config()))
    clamped = VLMambaVisionModel(tiny_mamba2_vision_config(time_step_limit=(0.0, 1e-3))).eval()
    clamped.load_state_dict(free.state_dict())
    assert clamped.layers[0].mixer.time_step_limit == (0.0, 1e-3)
    assert free.layers[0].mixer.time_step_limit == (0.0, float("inf"))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (free(pixels).last_hidden_state - clamped(pixels).last_hidden_state).abs().max() > 1e-4


def test_vision_time_step_limit_round_trips_through_dict_and_save_load(tmp_path):
    vision = tiny_mamba2_vision_config(time_step_limit=[0, 0.5])
    assert vision.time_step_limit == (0.0, 0.5)
    assert VLMambaVisionConfig.from_dict(vision.to_dict()).time_step_limit == (0.0, 0.5)
    vision.save_pretrained(tmp_path / "vision")
    assert VLMambaVisionConfig.from_pretrained(tmp_path / "vision").time_step_limit == (0.0, 0.5)

    default = tiny_mamba2_vision_config()
    default.save_pretrained(tmp_path / "default")
    assert VLMambaVisionConfig.from_pretrained(tmp_path / "default").time_step_limit == (0.0, float("inf"))

    config = VLMambaConfig(vision_config=vision, text_config=tiny_mamba2_config(), image_token_id=5)
    model = VLMambaForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "vlm")
    reloaded = VLMambaForConditionalGeneration.from_pretrained(tmp_path / "vlm")
    assert reloaded.config.vision_config.time_step_limit == (0.0, 0.5)
    assert reloaded.model.vision_tower.layers[0].mixer.time_step_limit == (0.0, 0.5)


@pytest.mark.parametrize("limit", [(0.5, 0.1), (0.1,), (0.0, 0.1, 0.2), (0.0, float("nan")), ("a", "b")])
def test_invalid_vision_time_step_limit_fails_naming_the_field(limit):
    with pytest.raises((ValueError, TypeError, StrictDataclassClassValidationError), match="time_step_limit"):
        tiny_mamba2_vision_config(time_step_limit=limit)


def test_invalid_text_time_step_limit_fails_naming_the_field():
    config = tiny_mamba2_config()
    config.time_step_limit = (0.2, 0.1)
    with pytest.raises(ValueError, match="time_step_limit"):
        VLMambaForCausalLM(config)

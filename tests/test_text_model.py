"""The Mamba language model against transformers' MambaForCausalLM, and generation on the recurrent cache."""

import json
import math

import pytest
import torch
from conftest import make_lively, tiny_mamba2_config, tiny_text_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file
from transformers import MambaConfig, MambaForCausalLM, TextStreamer

from vlm_mamba_hf import VLMambaForCausalLM

LOGITS_ATOL_FP32 = 1e-4


@pytest.fixture(scope="module")
def saved_reference(tmp_path_factory):
    """A folder written by transformers' own MambaForCausalLM.save_pretrained, and that model."""
    torch.manual_seed(0)
    reference = make_lively(MambaForCausalLM(tiny_text_config()))
    folder = tmp_path_factory.mktemp("mamba_ref")
    reference.save_pretrained(folder)
    return folder, reference


@pytest.fixture(scope="module")
def loaded(saved_reference):
    folder, _ = saved_reference
    model, info = VLMambaForCausalLM.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def test_transformers_checkpoint_loads_without_missing_or_unexpected_keys(loaded):
    _, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("length", [1, 7, 64, 513])
def test_logits_match_transformers_mamba(saved_reference, loaded, length):
    _, reference = saved_reference
    model, _ = loaded
    input_ids = torch.randint(3, 97, (2, length))
    with torch.no_grad():
        expected = reference(input_ids).logits
        got = model(input_ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= LOGITS_ATOL_FP32


def test_greedy_generate_matches_transformers_mamba(saved_reference, loaded):
    _, reference = saved_reference
    model, _ = loaded
    input_ids = torch.randint(3, 97, (2, 5))
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
    input_ids = torch.randint(3, 97, (2, 6))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, **mode)
    torch.manual_seed(123)
    cached = model.generate(input_ids, use_cache=True, **kwargs)
    torch.manual_seed(123)
    recomputed = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


def test_left_padded_row_generates_what_it_generates_alone(loaded):
    model, _ = loaded
    long_prompt = torch.randint(3, 97, (1, 9))
    short_prompt = torch.randint(3, 97, (1, 4))
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


def test_padded_logits_equal_unpadded_logits(loaded):
    model, _ = loaded
    prompt = torch.randint(3, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(prompt).logits
        with_pad = model(padded, attention_mask=mask).logits[:, 3:]
    assert (alone - with_pad).abs().max().item() <= LOGITS_ATOL_FP32


@pytest.mark.parametrize("make_config", [tiny_text_config, tiny_mamba2_config], ids=["mamba1", "mamba2"])
def test_right_padded_training_batch_loss_and_grads_equal_each_row_alone(make_config):
    """Training on a right-padded batch (the collator's layout) gives the loss and gradients of the rows run
    one at a time without padding, and so does a left-padded batch (which must be masked)."""
    model = make_lively(VLMambaForCausalLM(make_config())).train()
    rows = [torch.randint(3, 97, (n,)) for n in (11, 6, 9)]
    n_targets = sum(len(r) - 1 for r in rows)

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    alone = sum(model(r[None], labels=r[None]).loss * (len(r) - 1) for r in rows) / n_targets
    reference = grads_of(alone)
    longest = max(len(r) for r in rows)
    for side in ("right", "left"):
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            span = slice(0, len(r)) if side == "right" else slice(longest - len(r), longest)
            ids[i, span], labels[i, span], mask[i, span] = r, r, 1
            labels[i, span.start] = -100  # predicted from a pad position when padded on the left
        seen = []
        hooks = [
            layer.mixer.register_forward_pre_hook(
                lambda m, args, kwargs, seen=seen: seen.append(kwargs["attention_mask"]), with_kwargs=True
            )
            for layer in model.backbone.layers
        ]
        loss = model(ids, attention_mask=mask, labels=labels).loss
        for hook in hooks:
            hook.remove()
        # Right padding needs no mask in training (it is skipped, saving work); left padding keeps it.
        assert all((m is None) == (side == "right") for m in seen) and len(seen) == len(hooks)
        assert loss.item() == pytest.approx(alone.item(), rel=1e-5), side
        for name, grad in grads_of(loss).items():
            torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-4, msg=f"{side} {name}")


def test_text_streamer_receives_generated_tokens(loaded):
    model, _ = loaded

    class RecordingTokenizer:
        def decode(self, ids, **kwargs):
            return " ".join(f"t{i}" for i in ids)

    received = []

    class Recorder(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            received.append(text)

    input_ids = torch.randint(3, 97, (1, 4))
    out = model.generate(
        input_ids,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        streamer=Recorder(RecordingTokenizer()),
    )
    streamed = "".join(received).split()
    assert streamed == [f"t{i}" for i in out[0].tolist()]


def test_prefill_in_two_chunks_with_cache_equals_one_pass(loaded):
    model, _ = loaded
    ids = torch.randint(3, 97, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :13], use_cache=True)
        second = model(ids[:, 13:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_fresh_model_has_mamba_init():
    config = tiny_text_config(time_step_min=0.001, time_step_max=0.1)
    model = VLMambaForCausalLM(config)
    mixer = model.backbone.layers[0].mixer
    n = config.state_size
    expected_A_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(mixer.A_log)
    torch.testing.assert_close(mixer.A_log.data, expected_A_log)
    torch.testing.assert_close(mixer.D.data, torch.ones_like(mixer.D))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.data)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(model.lm_head.weight, model.backbone.embeddings.weight)


def test_from_pretrained_never_overwrites_loaded_weights(saved_reference):
    folder, _ = saved_reference
    weights = load_file(folder / "model.safetensors")
    model = VLMambaForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def test_state_dict_round_trips_with_transformers(loaded):
    model, _ = loaded
    reference = MambaForCausalLM(model.config)
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 97, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_loss_is_causal_lm_cross_entropy(loaded):
    model, _ = loaded
    ids = torch.randint(3, 97, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()


def test_logits_to_keep_returns_last_positions(loaded):
    model, _ = loaded
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:])


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", 0),
        ("num_hidden_layers", -1),
        ("state_size", 0),
        ("conv_kernel", 0),
        ("vocab_size", 0),
        ("hidden_act", "no_such_activation"),
    ],
)
def test_invalid_config_fails_when_built_naming_the_field(field, value):
    # transformers' strict config validation raises StrictDataclassClassValidationError, ours ValueError.
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=field):
        VLMambaForCausalLM(tiny_text_config(**{field: value}))


def test_token_id_outside_vocabulary_is_a_clear_error(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match=r"Token id 97 is outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[5, 97]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 5]]))


def test_empty_input_is_a_clear_error(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="Empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_attention_mask_shape_mismatch_is_a_clear_error(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, seq_len\) = \(2, 5\)"):
        model(torch.randint(3, 97, (2, 5)), attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_checkpoint_with_misshaped_tensor_names_tensor_and_shapes(saved_reference, tmp_path):
    folder, _ = saved_reference
    weights = load_file(folder / "model.safetensors")
    key = "backbone.layers.0.mixer.out_proj.weight"
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(Exception) as err:
        VLMambaForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert key in message and "(32, 65)" in message and "(32, 64)" in message


def test_checkpoint_with_missing_tensor_is_reported(saved_reference, tmp_path):
    folder, _ = saved_reference
    weights = load_file(folder / "model.safetensors")
    del weights["backbone.layers.1.mixer.A_log"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, info = VLMambaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert "backbone.layers.1.mixer.A_log" in info["missing_keys"]


def test_param_count_matches_transformers_for_130m_shape():
    config = MambaConfig(hidden_size=768, num_hidden_layers=1, vocab_size=50280)
    ours = sum(p.numel() for p in VLMambaForCausalLM(config).parameters())
    theirs = sum(p.numel() for p in MambaForCausalLM(config).parameters())
    assert ours == theirs and math.isclose(ours, 42.4e6, rel_tol=0.05)

"""The fixed-shape recurrent state (`VLMambaStateCache`): generation equal to the dynamic cache and to
recompute, buffers allocated once and written only in place, and a decode step that traces as one graph."""

import functools

import pytest
import torch
from conftest import make_lively, tiny_text_config
from test_mamba2 import tiny_mamba2_config
from test_vlm import tiny_vlm_config
from torch._dynamo.backends.debugging import aot_eager
from transformers import CompileConfig

from vlm_mamba_hf import VLMambaForCausalLM, VLMambaForConditionalGeneration
from vlm_mamba_hf.cache_vlm_mamba import VLMambaStateCache
from vlm_mamba_hf.tokenizer_utils import build_tokenizer

NEW_TOKENS = 10
GREEDY = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
MODES = {
    "greedy_batch2": dict(GREEDY),
    "beam3": dict(GREEDY, num_beams=3, num_return_sequences=2),
}


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def text_model(request):
    torch.manual_seed(0)
    config = tiny_text_config() if request.param == "mamba1" else tiny_mamba2_config()
    return make_lively(VLMambaForCausalLM(config))


@pytest.fixture(scope="module")
def vlm_model():
    tokenizer = build_tokenizer(["a red circle what color is the shape"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = make_lively(VLMambaForConditionalGeneration(tiny_vlm_config(tokenizer)))
    return model, tokenizer


def _prompt(batch: int = 2, length: int = 7, vocab: int = 97) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _vlm_inputs(model, tokenizer) -> dict[str, torch.Tensor]:
    n = model.config.num_image_tokens
    special = max(tokenizer.all_special_ids)
    text = torch.randint(special + 1, len(tokenizer), (2, 5), generator=torch.Generator().manual_seed(2))
    image = torch.full((2, n), model.config.image_token_id)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return {"input_ids": torch.cat([image, text], dim=1), "pixel_values": pixels}


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_static_cache_generation_equals_dynamic_cache_and_recompute(text_model, mode):
    ids = _prompt()
    static = text_model.generate(ids, cache_implementation="static", **mode)
    dynamic = text_model.generate(ids, **mode)
    recomputed = text_model.generate(ids, use_cache=False, **mode)
    assert len(set(static[0, -NEW_TOKENS:].tolist())) > 2
    assert torch.equal(static, dynamic)
    assert torch.equal(static, recomputed)


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_static_cache_generation_with_images_equals_dynamic_cache_and_recompute(vlm_model, mode):
    model, tokenizer = vlm_model
    inputs = _vlm_inputs(model, tokenizer)
    static = model.generate(**inputs, cache_implementation="static", **mode)
    dynamic = model.generate(**inputs, **mode)
    recomputed = model.generate(**inputs, use_cache=False, **mode)
    assert len(set(static[0, -NEW_TOKENS:].tolist())) > 2
    assert torch.equal(static, dynamic)
    assert torch.equal(static, recomputed)


def test_generate_with_static_cache_returns_a_preallocated_state_cache(text_model):
    out = text_model.generate(
        _prompt(), cache_implementation="static", return_dict_in_generate=True, num_beams=3, **GREEDY
    )
    cache = out.cache
    assert isinstance(cache, VLMambaStateCache)
    assert len(cache) == text_model.config.num_hidden_layers
    assert all(t.shape[0] == 2 * 3 for t in cache.state_tensors())  # batch x beams
    assert all(layer.recurrent_states[0].dtype == torch.float32 for layer in cache.layers)


def test_generate_reuses_the_static_state_across_calls_of_the_same_batch(text_model):
    kwargs = dict(cache_implementation="static", return_dict_in_generate=True, **GREEDY)
    first = text_model.generate(_prompt(), **kwargs)
    addresses = [t.data_ptr() for t in first.cache.state_tensors()]
    second = text_model.generate(_prompt(length=9), **kwargs)
    assert second.cache is first.cache
    assert [t.data_ptr() for t in second.cache.state_tensors()] == addresses
    assert torch.equal(second.sequences, text_model.generate(_prompt(length=9), **GREEDY))
    other_batch = text_model.generate(_prompt(batch=3), **kwargs)
    assert other_batch.cache is not first.cache


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_state_buffers_are_written_in_place_and_never_reallocated(text_model, mode):
    ids = _prompt()
    batch = ids.shape[0] * mode.get("num_beams", 1)
    cache = text_model.init_state_cache(batch)
    addresses = [t.data_ptr() for t in cache.state_tensors()]
    before = [t.clone() for t in cache.state_tensors()]
    with_cache = text_model.generate(ids, cache=cache, **mode)
    assert torch.equal(with_cache, text_model.generate(ids, **mode))
    assert [t.data_ptr() for t in cache.state_tensors()] == addresses
    assert all(not torch.equal(a, b) for a, b in zip(before, cache.state_tensors()))


def test_beam_reorder_permutes_rows_in_place():
    torch.manual_seed(0)
    model = VLMambaForCausalLM(tiny_text_config())
    cache = model.init_state_cache(3)
    for t in cache.state_tensors():
        t.copy_(torch.arange(3, dtype=t.dtype).view(3, *[1] * (t.dim() - 1)).expand_as(t))
    addresses = [t.data_ptr() for t in cache.state_tensors()]
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert [t.data_ptr() for t in cache.state_tensors()] == addresses
    for t in cache.state_tensors():
        assert t.flatten(1)[:, 0].tolist() == [2, 2, 0]


def test_reset_zeroes_the_state_and_the_cache_generates_again(text_model):
    ids = _prompt()
    cache = text_model.init_state_cache(2)
    first = text_model.generate(ids, cache=cache, **GREEDY)
    cache.reset()
    assert all(not t.any() for t in cache.state_tensors()) and not cache.has_previous_state()
    assert torch.equal(text_model.generate(ids, cache=cache, **GREEDY), first)


@pytest.fixture
def compile_counter():
    """A torch.compile backend (aot_eager: traced, functionalised, no code generation) that counts graphs."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs, **compile_options):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    yield backend, graphs
    torch._dynamo.reset()


def test_compiled_decode_step_traces_one_graph_and_never_recompiles(text_model, compile_counter):
    backend, graphs = compile_counter
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    ids = _prompt()
    eager = text_model.generate(ids, **GREEDY)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = text_model.generate(ids, cache_implementation="static", compile_config=config, **GREEDY)
    del text_model._compiled_call
    assert torch.equal(compiled, eager)
    assert len(graphs) == 1  # the decode step; the prefill runs eagerly


def compile_decode_steps(model, **compile_kwargs) -> None:
    """Route `model`'s one-token decode steps through `torch.compile(model.forward, **compile_kwargs)`.

    transformers compiles the decode step itself only in greedy/sampling loops; beam search calls the model
    eagerly. The prefill (long, variable length) stays eager.
    """
    eager = model.forward
    compiled = torch.compile(eager, **compile_kwargs)

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        cache, ids = kwargs.get("cache"), kwargs.get("input_ids")
        decoding = cache is not None and cache.has_previous_state() and ids is not None and ids.shape[1] == 1
        return (compiled if decoding else eager)(*args, **kwargs)

    model.forward = forward


def test_compiled_decode_step_decodes_beams_with_in_place_reorder_and_no_recompile(compile_counter):
    backend, graphs = compile_counter
    torch.manual_seed(0)
    model = make_lively(VLMambaForCausalLM(tiny_text_config()))
    ids = _prompt()
    eager = model.generate(ids, **MODES["beam3"])
    compile_decode_steps(model, backend=backend, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(ids, cache_implementation="static", **MODES["beam3"])
    assert len(graphs) == 1
    assert torch.equal(compiled, eager)


def test_compiled_decode_step_with_images_traces_one_graph(vlm_model, compile_counter):
    model, tokenizer = vlm_model
    backend, graphs = compile_counter
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend)
    config._compile_all_devices = True
    inputs = _vlm_inputs(model, tokenizer)
    eager = model.generate(**inputs, **GREEDY)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(**inputs, cache_implementation="static", compile_config=config, **GREEDY)
    del model._compiled_call
    assert torch.equal(compiled, eager)
    assert len(graphs) == 1


def test_static_state_made_under_inference_mode_is_replaced_outside_it(text_model):
    kwargs = dict(cache_implementation="static", return_dict_in_generate=True, **GREEDY)
    text_model.__dict__.pop("_static_state_cache", None)  # earlier tests may have left one made outside
    with torch.inference_mode():
        inside = text_model.generate(_prompt(), **kwargs)
    outside = text_model.generate(_prompt(), **kwargs)
    assert outside.cache is not inside.cache
    assert torch.equal(outside.sequences, inside.sequences)

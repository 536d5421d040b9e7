"""Image-contrastive decoding (`vlm_mamba_hf.image_contrast`) against a step-by-step recompute reference."""

import math

import pytest
import torch
from conftest import make_lively
from test_vlm import lively_tiny_vlm, random_image, tiny_processor, tiny_tokenizer
from transformers import GenerationConfig, LogitsProcessorList

from vlm_mamba_hf.image_contrast import ImageContrastLogitsProcessor, contrast_pixel_values
from vlm_mamba_hf.training.collator import format_prompt

STEPS = 8


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_tiny_vlm(tokenizer)


@pytest.fixture(scope="module")
def processor(tokenizer, model):
    return tiny_processor(tokenizer, model.config.num_image_tokens)


@pytest.fixture(scope="module")
def batch(processor):
    texts = ["<image> what color is the shape on the left", "<image> how many"]
    inputs = processor(images=[random_image(11), random_image(12)], text=texts, return_tensors="pt")
    assert inputs["attention_mask"][1, 0] == 0  # the second prompt is left-padded
    return inputs


@torch.no_grad()
def reference_decode(model, inputs, alpha, plausibility, steps=STEPS, takes_mask=True):
    """Greedy image-contrastive decoding the slow way: both branches recomputed from scratch every step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pixels = inputs["pixel_values"]
    blank = torch.stack(
        [p.reshape(p.shape[0], -1).median(dim=-1).values[:, None, None].expand_as(p) for p in pixels]
    )
    for _ in range(steps):
        extra = {"attention_mask": mask} if takes_mask else {}
        real = (
            model(input_ids=ids, pixel_values=pixels, use_cache=False, **extra).logits[:, -1].log_softmax(-1)
        )
        contrast = model(input_ids=ids, pixel_values=blank, use_cache=False, **extra).logits[:, -1]
        scores = (1 + alpha) * real - alpha * contrast.log_softmax(-1)
        keep = real >= real.max(-1, keepdim=True).values + math.log(plausibility)
        token = scores.masked_fill(~keep, -math.inf).argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, **kwargs)


def test_contrast_image_is_each_images_per_channel_median():
    pixels = torch.randn(2, 3, 5, 7)
    blank = contrast_pixel_values(pixels)
    assert blank.shape == pixels.shape
    for i in range(2):
        for c in range(3):
            assert torch.all(blank[i, c] == pixels[i, c].flatten().median())
    with pytest.raises(ValueError, match="channels, height, width"):
        contrast_pixel_values(torch.randn(3, 5))


@pytest.mark.parametrize("alpha,plausibility", [(1.0, 0.1), (3.0, 0.01)])
def test_cached_contrastive_generation_equals_recompute_reference(model, batch, alpha, plausibility):
    # VLMamba's contrast branch steps its own recurrent state rather than recomputing.
    assert ImageContrastLogitsProcessor(model, batch["input_ids"], batch["pixel_values"])._stateful
    got = generate(model, batch, image_contrast=alpha, image_contrast_plausibility=plausibility)
    expected = reference_decode(model, batch, alpha, plausibility)
    assert torch.equal(got, expected)
    # The contrast changed the text (or this test would not see a broken contrast branch).
    assert not torch.equal(got, generate(model, batch))


def test_alpha_zero_and_text_only_calls_decode_as_usual(model, batch, tokenizer):
    assert torch.equal(generate(model, batch, image_contrast=0.0), generate(model, batch))
    ids = torch.tensor(tokenizer(["what color is the shape"])["input_ids"])
    text_only = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, image_contrast=2.0)
    assert torch.equal(text_only, model.generate(input_ids=ids, max_new_tokens=5, do_sample=False))


def test_every_chosen_token_is_plausible_under_the_real_image(model, batch):
    plausibility = 0.2
    out = generate(
        model,
        batch,
        image_contrast=5.0,
        image_contrast_plausibility=plausibility,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    for step, logits in enumerate(out.logits):
        probs = logits.softmax(-1)
        chosen = probs.gather(1, new[:, step : step + 1]).squeeze(1)
        assert torch.all(chosen >= plausibility * probs.max(-1).values - 1e-6)


def test_generation_config_turns_it_on_and_round_trips(model, batch, tmp_path):
    config = GenerationConfig(do_sample=False, image_contrast=1.0, image_contrast_plausibility=0.1)
    config.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    got = generate(model, batch, generation_config=loaded)
    assert torch.equal(got, reference_decode(model, batch, 1.0, 0.1))
    # A call's own setting wins over the config's.
    assert torch.equal(
        generate(model, batch, generation_config=loaded, image_contrast=0.0), generate(model, batch)
    )


def test_sampling_with_several_return_sequences_runs_each_row_against_its_prompt(model, batch):
    torch.manual_seed(0)
    out = model.generate(
        **batch, max_new_tokens=4, do_sample=True, num_return_sequences=3, image_contrast=1.0, top_k=0
    )
    assert out.shape[0] == 6
    # Each row's prompt is its own sample's, repeated as generate() repeats it.
    assert torch.equal(out[:3, : batch["input_ids"].shape[1]], batch["input_ids"][:1].expand(3, -1))
    # And each repeated row is scored against its own prompt's contrast branch: rows expanded 3x get the
    # scores of the unexpanded batch, repeated.
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    scores = torch.randn(2, model.config.text_config.vocab_size)
    alone = ImageContrastLogitsProcessor(model, ids, pixels, mask)(ids, scores.clone())
    expanded = ImageContrastLogitsProcessor(model, ids, pixels, mask)(
        ids.repeat_interleave(3, dim=0), scores.repeat_interleave(3, dim=0)
    )
    assert torch.allclose(expanded, alone.repeat_interleave(3, dim=0), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_contrast=-1.0), "finite number >= 0"),
        (dict(image_contrast=float("nan")), "finite number >= 0"),
        (dict(image_contrast=1.0, image_contrast_plausibility=0.0), r"in \(0, 1\]"),
        (dict(image_contrast=1.0, image_contrast_plausibility=1.5), r"in \(0, 1\]"),
        (dict(image_contrast=1.0, num_beams=2), "not beam search"),
    ],
)
def test_bad_settings_are_clear_errors(model, batch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(**batch, max_new_tokens=2, **kwargs)


def _contrast(model, inputs, alpha=2.0, plausibility=0.05):
    processor = ImageContrastLogitsProcessor(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], alpha, plausibility
    )
    return processor, LogitsProcessorList([processor])


def test_any_image_text_model_works_through_the_recompute_path(tokenizer):
    """LLaVA returns no recurrent cache: the processor recomputes the contrast branch each step."""
    from benchmarks.bench_quality import build_llava
    from vlm_mamba_hf.training.evaluate import generate_answers
    from vlm_mamba_hf.training.recipes import get_recipe

    sizes = dict(
        vision_hidden_size=32,
        vision_layers=1,
        vision_intermediate_size=64,
        text_hidden_size=32,
        text_layers=1,
        text_intermediate_size=64,
    )
    llava = make_lively(build_llava(get_recipe("tiny"), tokenizer, sizes), scale=4.0).eval()
    processor = tiny_processor(tokenizer, 16)
    inputs = processor(
        images=[random_image(13)], text=["<image> what color is the shape"], return_tensors="pt"
    )
    contrast, processors = _contrast(llava, inputs)
    got = generate(llava, inputs, logits_processor=processors)
    assert contrast._stateful is False
    assert torch.equal(got, reference_decode(llava, inputs, 2.0, 0.05, takes_mask=False))
    assert not torch.equal(got, generate(llava, inputs))
    # The evaluation code gives any model the same processor.
    question = "what color is the shape"
    answers = generate_answers(
        llava, processor, [random_image(13)], [question], image_contrast=2.0, image_contrast_plausibility=0.05
    )
    prompt = processor(images=[random_image(13)], text=[format_prompt(question)], return_tensors="pt")
    ids = llava.generate(
        **prompt, max_new_tokens=8, do_sample=False, logits_processor=_contrast(llava, prompt)[1]
    )
    expected = processor.batch_decode(ids[:, prompt["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert answers == [expected.strip()]

"""Training: collator labels, Trainer with gradient accumulation, resume, torchrun, checkpointing, bad input."""

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from transformers import TrainerCallback

from vlm_mamba_hf.data.shapes import (
    CAPTION_PROMPT,
    COLORS,
    COLOURS_PROMPT,
    HELDOUT_PAIRS,
    OTHER_SHAPES,
    SHAPES,
    SHAPES_PROMPT,
    ShapeWordSwap,
)
from vlm_mamba_hf.metrics import tokenize_caption
from vlm_mamba_hf.modeling_vlm_mamba import VLMambaForConditionalGeneration
from vlm_mamba_hf.training.collator import IGNORE_INDEX, VLMambaDataCollator, format_prompt
from vlm_mamba_hf.training.recipes import (
    ExampleList,
    any_colour_examples,
    any_shape_examples,
    build_collator,
    build_focus_dataset,
    build_model_config,
    build_processor,
    build_train_dataset,
    easy_vqa_chats,
    focus_recipe,
    get_recipe,
    recipe_texts,
    shapes_examples,
)
from vlm_mamba_hf.training.train import (
    VLMambaTrainer,
    _recipe_from_args,
    build_parser,
    check_resume_compatible,
    cpu_supports_bf16,
    is_vision_parameter,
    mixture_time_budget,
    run_focus_stage,
    split_vision_param_groups,
    training_arguments,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recipe():
    return get_recipe("tiny", easy_vqa_limit=120, shapes_train_scenes=20)


@pytest.fixture(scope="module")
def processor(recipe):
    return build_processor(recipe)


@pytest.fixture(scope="module")
def train_dataset(recipe):
    return build_train_dataset(recipe)


def _image(color=(200, 30, 30)) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (64, 64), color)


def _model(recipe, processor, seed=0) -> VLMambaForConditionalGeneration:
    torch.manual_seed(seed)
    return VLMambaForConditionalGeneration(build_model_config(recipe, processor.tokenizer))


def _qa(answer="red", question="what color is the shape?", image=True):
    return {"image": _image() if image else None, "prompt": question, "answer": answer}


def _random_answer_noise(vocab_size, probability=0.3, seed=0, avoid=()):
    """Input noise keyed by the example's ids (as ShapeWordSwap's): each answer token replaced with
    `probability` by a random token other than those in `avoid`."""
    tokens = [i for i in range(vocab_size) if i not in set(avoid)]

    def noise(ids, labels):
        rng = random.Random(f"{seed}/{ids}")
        for t, label in enumerate(labels):
            if label != IGNORE_INDEX and rng.random() < probability:
                ids[t] = rng.choice(tokens)
        return ids

    return noise


# ----------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------


def test_collator_labels_only_answers_and_eos(processor):
    collator = VLMambaDataCollator(processor)
    chat = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is it?"}]},
            {"role": "assistant", "content": "circle"},
            {"role": "user", "content": "is there a red shape?"},
            {"role": "assistant", "content": "yes"},
        ],
        "images": [_image()],
    }
    batch = collator([_qa("red"), chat])
    tok = processor.tokenizer
    n_img = processor.image_seq_length
    size = processor.image_processor.size["height"]
    assert batch["pixel_values"].shape == (2, 3, size, size)
    for row, answers in enumerate([["red"], ["circle", "yes"]]):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        supervised = labels != IGNORE_INDEX
        assert torch.equal(labels[supervised], ids[supervised])
        expected = []
        for answer in answers:
            expected += tok.encode(" " + answer, add_special_tokens=False) + [tok.eos_token_id]
        assert labels[supervised].tolist() == expected
        image_positions = ids == processor.image_token_id
        assert int(image_positions.sum()) == n_img
        assert not supervised[image_positions].any()
        assert not supervised[mask == 0].any()
        # Right padding: real tokens first.
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()


def test_collator_text_matches_the_chat_template(processor):
    """Training text is the processor's chat template; inference prompts are its generation prompt."""
    collator = VLMambaDataCollator(processor)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}],
        },
        {"role": "assistant", "content": "teal"},
        {"role": "user", "content": "is there a circle?"},
        {"role": "assistant", "content": "no"},
    ]
    ids, _ = collator.encode(messages)
    template = processor.apply_chat_template(messages, tokenize=False)
    expanded = template.replace(processor.image_token, processor.image_token * processor.image_seq_length)
    assert ids == processor.tokenizer.encode(expanded, add_special_tokens=False)
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == format_prompt("what color is the shape?")


def test_collator_skips_undecodable_images_and_counts_them(processor, tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    collator = VLMambaDataCollator(processor)
    with caplog.at_level(logging.WARNING):
        batch = collator([_qa("red"), {"image": str(broken), "prompt": "what shape?", "answer": "circle"}])
    assert batch["input_ids"].shape[0] == 1
    assert collator.stats["skipped_images"] == 1
    assert "could not be decoded" in caplog.text and "1 skipped so far" in caplog.text


def test_collator_truncates_long_answers_with_a_warning(processor, caplog):
    collator = VLMambaDataCollator(processor, max_length=processor.image_seq_length + 30)
    with caplog.at_level(logging.WARNING):
        batch = collator([_qa(" ".join(["a red circle at the top left"] * 20))])
    assert batch["input_ids"].shape[1] == processor.image_seq_length + 30
    assert collator.stats["truncated"] == 1
    assert "truncated" in caplog.text
    assert (batch["labels"] != IGNORE_INDEX).any()
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == processor.image_seq_length


def test_collator_takes_examples_without_images(processor):
    batch = VLMambaDataCollator(processor)([_qa(image=False), _qa(image=False)])
    assert "pixel_values" not in batch
    assert not (batch["input_ids"] == processor.image_token_id).any()
    mixed = VLMambaDataCollator(processor)([_qa(image=False), _qa()])
    assert mixed["pixel_values"].shape[0] == 1


def test_collator_input_noise_changes_input_ids_but_never_labels(processor):
    example = _qa(answer="a red circle at the top left and a blue square on the right.")
    clean = VLMambaDataCollator(processor)([example])
    noisy = VLMambaDataCollator(
        processor,
        input_noise=_random_answer_noise(len(processor.tokenizer), 1.0, avoid=[processor.image_token_id]),
    )([example])
    answer = clean["labels"] != IGNORE_INDEX
    assert torch.equal(noisy["labels"], clean["labels"])
    assert torch.equal(noisy["input_ids"][~answer], clean["input_ids"][~answer])
    assert not torch.equal(noisy["input_ids"][answer], clean["input_ids"][answer])


def test_collator_refuses_noise_that_touches_the_prompt_or_the_length(processor):
    example = _qa()
    prompt_noise = VLMambaDataCollator(processor, input_noise=lambda ids, labels: [ids[1] + 1, *ids[1:]])
    with pytest.raises(ValueError, match="change answer positions only"):
        prompt_noise([example])
    longer = VLMambaDataCollator(processor, input_noise=lambda ids, labels: [*ids, ids[-1]])
    with pytest.raises(ValueError, match="as many ids"):
        longer([example])
    image = processor.image_token_id
    image_noise = VLMambaDataCollator(
        processor,
        input_noise=lambda ids, labels: [
            image if label != IGNORE_INDEX else i for i, label in zip(ids, labels)
        ],
    )
    with pytest.raises(ValueError, match="image token"):
        image_noise([example])


@pytest.fixture(scope="module")
def default_processor():
    from transformers import AutoProcessor

    from vlm_mamba_hf import DEFAULT_MODEL

    return AutoProcessor.from_pretrained(DEFAULT_MODEL)


def _words(tokenizer, ids):
    return tokenizer.decode(ids).replace(",", " ").replace(".", " ").split()


def test_shape_word_swap_replaces_shapes_before_colours_in_answers_only(default_processor):
    tokenizer = default_processor.tokenizer
    collator = VLMambaDataCollator(default_processor, input_noise=ShapeWordSwap(tokenizer, probability=1.0))
    caption = (
        "a circle in red at the top left, a square in yellow at the top, a triangle in purple in the center "
        "and a square in orange on the right."
    )
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "is the circle in red?"}],
            },
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "Describe the image."},
            {"role": "assistant", "content": caption},
        ],
        "image": _image(),
    }
    clean = VLMambaDataCollator(default_processor)([chat])
    seen = []
    for seed in range(30):
        collator.input_noise.seed = seed
        batch = collator([chat])
        assert torch.equal(
            collator([chat])["input_ids"], batch["input_ids"]
        )  # a function of seed and example
        assert torch.equal(batch["labels"], clean["labels"])
        answer = clean["labels"][0] != IGNORE_INDEX
        assert torch.equal(
            batch["input_ids"][0][~answer], clean["input_ids"][0][~answer]
        )  # the question keeps "circle in red"
        words = _words(tokenizer, batch["input_ids"][0][answer].tolist())
        true = _words(tokenizer, clean["input_ids"][0][answer].tolist())
        pairs = [(w, c) for w, link, c in zip(words, words[1:], words[2:]) if link == "in" and c in COLORS]
        true_pairs = [(w, c) for w, link, c in zip(true, true[1:], true[2:]) if link == "in" and c in COLORS]
        assert len(true_pairs) == 4 and [c for _, c in pairs] == [c for _, c in true_pairs]
        for (shape, colour), (true_shape, _) in zip(pairs, true_pairs):
            assert shape in SHAPES and shape != true_shape  # probability 1: always another shape
            assert (colour, shape) not in HELDOUT_PAIRS  # never writes a held-out pair
        assert pairs[0] == ("triangle", "red")  # not "square in red": the only other shape left
        seen.append(tuple(pairs))
    assert len(set(seen)) > 5  # the replacements are random, not one fixed rewrite


def test_shape_word_swap_probability_zero_is_the_identity_and_bad_input_is_refused(default_processor):
    tokenizer = default_processor.tokenizer
    example = _qa(answer="a circle in yellow at the top left.", question="Describe the image.")
    clean = VLMambaDataCollator(default_processor)([example])
    off = VLMambaDataCollator(default_processor, input_noise=ShapeWordSwap(tokenizer, probability=0.0))(
        [example]
    )
    assert torch.equal(off["input_ids"], clean["input_ids"])
    # A shape followed by a position, not a colour ("a square in the center"), is never replaced.
    description = _qa(
        answer="a square in the center and a circle on the right.", question="Describe the shapes."
    )
    always = VLMambaDataCollator(default_processor, input_noise=ShapeWordSwap(tokenizer, probability=1.0))
    assert torch.equal(
        always([description])["input_ids"], VLMambaDataCollator(default_processor)([description])["input_ids"]
    )
    with pytest.raises(ValueError, match="probability"):
        ShapeWordSwap(tokenizer, probability=1.5)
    tiny_tokenizer = build_processor(get_recipe("tiny")).tokenizer  # 320 tokens: colour words split
    with pytest.raises(ValueError, match="one token"):
        ShapeWordSwap(tiny_tokenizer)


def test_recipe_collator_uses_shape_swap_when_asked(recipe, default_processor):
    assert build_collator(recipe, default_processor).input_noise is None  # tiny: off
    collator = build_collator(get_recipe("default"), default_processor)
    assert isinstance(collator.input_noise, ShapeWordSwap)
    assert collator.input_noise.probability == get_recipe("default").shape_swap_probability > 0
    assert collator.max_length == get_recipe("default").max_length


@pytest.mark.parametrize("captions", [True, False])
def test_any_colour_examples_are_colour_free_chats_and_descriptions(recipe, captions):
    run = recipe.replace(any_colour_scenes=30, any_colour_captions=captions)
    examples = any_colour_examples(run)
    chats = [e for e in examples if "messages" in e]
    descriptions = [e for e in examples if "messages" not in e]
    assert len(chats) == 30 and len(descriptions) == (30 if captions else 0)
    for example in chats:
        answers = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
        assert 1 <= len(answers) <= recipe.turns
        assert not set(answers) & set(COLORS)
    for example in descriptions:
        assert example["prompt"] == SHAPES_PROMPT
        assert not [c for c in COLORS if c in example["answer"]]
    without = len(build_train_dataset(run.replace(any_colour_scenes=0)))
    assert len(build_train_dataset(run)) == without + 30 * (2 if captions else 1)


def test_colour_captions_add_one_shape_free_description_per_scene(recipe):
    run = recipe.replace(shapes_train_scenes=20, colour_captions=True)
    examples = shapes_examples(run)
    colours = [e for e in examples if e.get("prompt") == COLOURS_PROMPT]
    captions = [e for e in examples if e.get("prompt") == CAPTION_PROMPT]
    assert len(colours) == len(captions) == 20
    for colour, caption in zip(colours, captions):
        assert colour["image"] is caption["image"]
        assert not [s for s in SHAPES if s in colour["answer"]]

        # The same colours in the same order as the caption names them.
        def named(text):
            return [w for w in tokenize_caption(text) if w in COLORS]

        assert named(colour["answer"]) == named(caption["answer"])
    assert len(shapes_examples(run.replace(colour_captions=False))) == len(examples) - 20
    texts = recipe_texts(run)
    assert COLOURS_PROMPT in texts and colours[0]["answer"] in texts


def test_any_shape_examples_are_colour_descriptions_and_shape_free_chats_in_the_mixture_and_card(recipe):
    from vlm_mamba_hf.training.train import model_card_sections

    run = recipe.replace(any_shape_scenes=30)
    examples = any_shape_examples(run)
    chats = [e for e in examples if "messages" in e]
    descriptions = [e for e in examples if "messages" not in e]
    assert len(chats) == len(descriptions) == 30
    shape_words = set(SHAPES + OTHER_SHAPES)
    for chat, description in zip(chats, descriptions):
        assert chat["images"] == [description["image"]]
        assert description["prompt"] == COLOURS_PROMPT
        answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        assert 1 <= len(answers) <= recipe.turns
        texts = [description["answer"], *answers, *(str(m["content"]) for m in chat["messages"])]
        assert not shape_words & set(tokenize_caption(" ".join(texts)))
        # Every colour the description names is one the questions may ask; the answers are palette colours
        # or the object count.
        assert set(answers) <= set(COLORS) | {"one", "two", "three"}
    without = recipe.replace(any_shape_scenes=0)
    assert len(build_train_dataset(run)) == len(build_train_dataset(without)) + 60
    texts = recipe_texts(run)
    assert COLOURS_PROMPT in texts and descriptions[0]["answer"] in texts
    assert COLOURS_PROMPT not in recipe_texts(without)
    args = build_parser().parse_args(["--any-shape-scenes", "7"])
    assert _recipe_from_args(args).any_shape_scenes == 7
    assert get_recipe("default").any_shape_scenes == 4000 and get_recipe("tiny").any_shape_scenes == 50
    summary = {"world_size": 1, "steps": 1, "train_seconds": 1.0, "examples_per_second": 1.0}
    card = model_card_sections({**summary, "recipe": run.to_dict()})
    assert "30 any-shape scenes" in " ".join(card.values())
    assert "any-shape" not in " ".join(model_card_sections({**summary, "recipe": without.to_dict()}).values())


def test_collator_error_names_remove_unused_columns(processor):
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        VLMambaDataCollator(processor)([{"input_ids": [1, 2]}])


# ----------------------------------------------------------------------------------------------------------
# Recipe data
# ----------------------------------------------------------------------------------------------------------


def _answers(chats) -> list[str]:
    return [m["content"] for chat in chats for m in chat["messages"] if m["role"] == "assistant"]


@pytest.mark.parametrize("types", [("shape",), ("shape", "colour"), ("yesno",)])
def test_easy_vqa_answer_types_keep_exactly_those_questions(types):
    from vlm_mamba_hf.data.easy_vqa import EasyVQADataset

    recipe = get_recipe("tiny", easy_vqa_limit=300, easy_vqa_answer_types=types)
    chats = easy_vqa_chats(recipe)
    # Reference: the same subset of the dataset, filtered by hand.
    shapes, yes_no = {"circle", "rectangle", "triangle"}, {"yes", "no"}
    wanted = {"shape": lambda a: a in shapes, "yesno": lambda a: a in yes_no}
    wanted["colour"] = lambda a: a not in shapes | yes_no
    reference = [
        e["answer"]
        for e in EasyVQADataset("train", limit=300, seed=recipe.seed).examples
        if any(wanted[t](e["answer"]) for t in types)
    ]
    assert sorted(_answers(chats)) == sorted(reference) and reference
    assert all(len(chat["messages"]) <= 2 * recipe.turns for chat in chats)


def test_easy_vqa_chats_show_no_heldout_pair_when_asked():
    from vlm_mamba_hf.data.easy_vqa import easy_vqa_object, shapes_heldout_pairs

    def pairs_shown(chats):
        return {
            (c, s) for chat in chats for c, shapes in [easy_vqa_object(chat["images"][0])] for s in shapes
        }

    recipe = get_recipe("tiny", easy_vqa_limit=1500)
    assert pairs_shown(easy_vqa_chats(recipe)) & shapes_heldout_pairs() == shapes_heldout_pairs()
    excluded = pairs_shown(easy_vqa_chats(recipe.replace(easy_vqa_exclude_heldout=True)))
    assert excluded and not excluded & shapes_heldout_pairs()


def test_easy_vqa_answer_types_from_the_command_line_and_bad_values():
    args = build_parser().parse_args(["--recipe", "tiny", "--easy-vqa-answer-types", "shape", "colour"])
    assert _recipe_from_args(args).easy_vqa_answer_types == ("shape", "colour")
    assert _recipe_from_args(build_parser().parse_args(["--recipe", "tiny"])).easy_vqa_answer_types is None
    for bad in [(), ("shapes",)]:
        with pytest.raises(ValueError, match="easy_vqa_answer_types"):
            easy_vqa_chats(get_recipe("tiny", easy_vqa_limit=50, easy_vqa_answer_types=bad))


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------


def test_focus_stage_data_and_recipe(recipe):
    focused = recipe.replace(focus_steps=3, focus_answer_types=("shape",), focus_learning_rate=2e-3)
    stage = focus_recipe(focused)
    assert (stage.max_steps, stage.learning_rate, stage.turns, stage.time_budget_s) == (3, 2e-3, 1, None)
    chats = build_focus_dataset(focused).examples
    assert chats and all(len(chat["messages"]) == 2 for chat in chats)  # one question per chat
    assert sorted(_answers(chats)) == sorted(
        _answers(easy_vqa_chats(recipe.replace(easy_vqa_answer_types=("shape",))))
    )
    assert set(_answers(chats)) <= {"circle", "rectangle", "triangle"}
    with pytest.raises(ValueError, match="focus_steps must be >= 0"):
        focus_recipe(recipe.replace(focus_steps=-1))
    assert _recipe_from_args(build_parser().parse_args(["--focus-steps", "0"])).focus_steps == 0
    # With focus_scenes, the any-colour and any-shape scenes' examples join, one question per chat.
    assert get_recipe("default").focus_scenes is False
    assert _recipe_from_args(build_parser().parse_args(["--focus-scenes"])).focus_scenes is True
    with_scenes = build_focus_dataset(focused.replace(focus_scenes=True)).examples
    scene_examples = any_colour_examples(stage) + any_shape_examples(stage)
    assert len(with_scenes) == len(chats) + len(scene_examples)

    def answers(examples):
        return sorted(
            _answers([e for e in examples if "messages" in e])
            + [e["answer"] for e in examples if "answer" in e]
        )

    assert answers(with_scenes) == answers(list(chats) + scene_examples)
    assert {"Describe the shapes.", "Describe the colours."} <= {e.get("prompt") for e in with_scenes}
    assert all(len(example["messages"]) == 2 for example in with_scenes if "messages" in example)


def test_data_flags_reach_the_recipe_and_their_absence_keeps_its_values():
    args = ["--any-colour-scenes", "10", "--no-any-colour-captions", "--colour-captions"]
    recipe = _recipe_from_args(build_parser().parse_args([*args, "--shape-swap-probability", "0"]))
    assert (recipe.any_colour_scenes, recipe.any_colour_captions, recipe.colour_captions) == (10, False, True)
    assert recipe.shape_swap_probability == 0.0
    assert _recipe_from_args(build_parser().parse_args([])) == get_recipe("default")
    assert not get_recipe("default").easy_vqa_exclude_heldout
    flag = build_parser().parse_args(["--easy-vqa-exclude-heldout"])
    assert _recipe_from_args(flag).easy_vqa_exclude_heldout is True


@pytest.mark.parametrize("factored", [False, True])
def test_foreground_channel_reaches_the_saved_model_and_its_card_and_the_flags_switch_it(
    processor, tmp_path, factored
):
    from vlm_mamba_hf.training.train import main

    assert get_recipe("default").foreground_channel is True and get_recipe("tiny").foreground_channel is False
    off = _recipe_from_args(build_parser().parse_args(["--no-foreground-channel"]))
    assert off.foreground_channel is False
    assert build_model_config(off, processor.tokenizer).vision_config.foreground_channel is False
    assert off.factored_patches is False  # built from the channel, they go with it
    both = _recipe_from_args(build_parser().parse_args(["--no-foreground-channel", "--factored-patches"]))
    with pytest.raises(Exception, match="factored_patches=True needs foreground_channel=True"):
        build_model_config(both, processor.tokenizer)
    flags = ["--factored-patches"] if factored else []
    main(
        ["--recipe", "tiny", "--foreground-channel", *flags, "--max-steps", "1", "--easy-vqa-limit", "40",
         "--shapes-train-scenes", "8", "--output-dir", str(tmp_path), "--no-eval", "--no-progress"]
    )  # fmt: skip
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["vision_config"]["foreground_channel"] is True
    assert saved["vision_config"]["factored_patches"] is factored
    reloaded = VLMambaForConditionalGeneration.from_pretrained(tmp_path / "final")
    embed = reloaded.model.vision_tower.patch_embed
    assert embed.proj.in_features == (1 if factored else 4) * 8 * 8  # tiny: 8 px patches
    card = (tmp_path / "final" / "README.md").read_text()
    assert "foreground channel" in card
    assert ("shape and colour apart" in card) is factored


def test_focus_stage_trains_the_model_in_place_and_zero_steps_leave_it(recipe, processor, tmp_path):
    model = _model(recipe, processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    collator = VLMambaDataCollator(processor)
    assert run_focus_stage(recipe.replace(focus_steps=0), model, collator, tmp_path) == {
        "steps": 0,
        "seconds": 0.0,
    }
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    focus = run_focus_stage(
        recipe.replace(focus_steps=2, batch_size=4), model, collator, tmp_path, disable_tqdm=True
    )
    assert focus["steps"] == 2 and focus["seconds"] > 0 and focus["answer_types"] == ["shape"]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("vision_tower" in n for n in moved) and any("language_model" in n for n in moved)
    assert not (tmp_path / "focus" / "checkpoint-2").exists()  # the stage saves no checkpoints


def test_the_mixture_gets_what_the_focus_stage_left_of_the_budget(recipe):
    timed = recipe.replace(time_budget_s=100.0)
    assert mixture_time_budget(timed, {"steps": 5, "seconds": 30.0}).budget_s == 70.0
    assert mixture_time_budget(timed, {"steps": 5, "seconds": 130.0}).budget_s == 0.0
    assert mixture_time_budget(recipe, {"steps": 5, "seconds": 30.0}) is None  # the tiny recipe has no budget


def test_train_command_runs_the_focus_stage_before_the_mixture(tmp_path):
    from vlm_mamba_hf.training.train import main

    summary = main(
        ["--recipe", "tiny", "--focus-steps", "2", "--max-steps", "3", "--easy-vqa-limit", "120",
         "--shapes-train-scenes", "20", "--output-dir", str(tmp_path), "--no-eval", "--no-progress"]
    )  # fmt: skip
    assert summary["focus_stage"]["steps"] == 2 and summary["steps"] == 3
    saved = json.loads((tmp_path / "final" / "training_summary.json").read_text())
    assert saved["focus_stage"]["steps"] == 2
    assert "focus stage of 2 steps" in (tmp_path / "final" / "README.md").read_text()


def _args(tmp_path, recipe, **overrides):
    kwargs = dict(disable_tqdm=True, logging_steps=1, save_strategy="no", warmup_steps=0)
    kwargs.update(overrides)
    return training_arguments(recipe, str(tmp_path), **kwargs)


def test_gradient_accumulation_loss_is_token_weighted(recipe, processor, train_dataset, tmp_path):
    """With accumulation, num_items_in_batch reaches the loss: one step = token-mean over all micro-batches."""
    examples = [
        _qa("red"),
        _qa("a red circle at the top left, a blue square in the center."),
        _qa("no"),
        _qa("yes"),
    ]
    dataset = ExampleList(examples)
    collator = VLMambaDataCollator(processor)
    model = _model(recipe, processor)
    reference = _model(recipe, processor)
    args = _args(
        tmp_path,
        recipe.replace(batch_size=2, grad_accum=2, max_steps=1, learning_rate=1.0, weight_decay=0.0),
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
    )
    trainer = VLMambaTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()

    # Manual: token-weighted mean over the 4 examples, gradient of it, one SGD step with lr 1.
    batches = [collator(examples[:2]), collator(examples[2:])]
    n_items = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        loss = reference(**batch, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.item()
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(total, rel=1e-4)
    per_batch_mean = sum(reference(**b).loss.item() for b in batches) / 2
    assert abs(per_batch_mean - total) > 1e-3  # the two normalisations differ on these examples
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        expected = q.detach() - q.grad if q.grad is not None else q.detach()
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5, msg=name)


def test_vision_lr_scale_scales_only_the_image_path(recipe, processor, tmp_path):
    """One SGD step (lr 1, no decay, no clipping): image-path parameters move by scale x their gradient, the
    rest by their gradient, against a manual step on a copy."""
    examples = [_qa("red"), _qa("a red circle at the top left.")]
    collator = VLMambaDataCollator(processor)
    model, reference = _model(recipe, processor), _model(recipe, processor)
    args = _args(
        tmp_path,
        recipe.replace(batch_size=2, max_steps=1, learning_rate=1.0, weight_decay=0.0),
        optim="sgd",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
    )
    trainer = VLMambaTrainer(
        model=model,
        args=args,
        train_dataset=ExampleList(examples),
        data_collator=collator,
        vision_lr_scale=0.25,
    )
    trainer.train()

    reference(**collator(examples)).loss.backward()
    vision_names = [n for n, _ in reference.named_parameters() if is_vision_parameter(n)]
    assert any("patch_embed" in n for n in vision_names) and any(
        "multi_modal_projector" in n for n in vision_names
    )
    assert not any("language_model" in n for n in vision_names)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        scale = 0.25 if name in vision_names else 1.0
        expected = q.detach() - scale * q.grad
        assert q.grad.abs().max() > 0, name
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)


def test_split_vision_param_groups_keeps_every_parameter_once_and_checks_its_input(recipe, processor):
    model = _model(recipe, processor)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=2e-3
    )
    split_vision_param_groups(model, optimizer, 0.5)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        vision = {is_vision_parameter(by_id[id(p)]) for p in group["params"]}
        assert len(vision) == 1  # no group mixes the two paths
        assert group["lr"] == pytest.approx(1e-3 if vision.pop() else 2e-3)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.1, 0.0}
    with pytest.raises(ValueError, match="must be positive"):
        split_vision_param_groups(model, optimizer, 0.0)
    with pytest.raises(ValueError, match="must be positive"):
        VLMambaTrainer(model=model, args=None, vision_lr_scale=-1.0)
    parse = build_parser().parse_args
    assert _recipe_from_args(parse(["--vision-lr-scale", "0.3"])).vision_lr_scale == 0.3
    assert _recipe_from_args(parse(["--no-projector-layernorm"])).projector_layernorm is False
    assert _recipe_from_args(parse([])).projector_layernorm is True  # the recipe's default stands


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("noise", [False, True], ids=["plain", "input-noise"])
def test_resume_from_checkpoint_matches_uninterrupted_run(recipe, processor, train_dataset, tmp_path, noise):
    run = recipe.replace(max_steps=6, save_steps=3, batch_size=4)
    # With input noise keyed by the example (as ShapeWordSwap's), the resumed run sees the same noise as the
    # uninterrupted one. (Noise from torch's generator would not: the data loader collates a batch ahead.)
    input_noise = (
        _random_answer_noise(len(processor.tokenizer), avoid=[processor.image_token_id]) if noise else None
    )
    collator = VLMambaDataCollator(processor, input_noise=input_noise)

    def trainer(out, callbacks=()):
        args = _args(out, run, save_strategy="steps", save_steps=3, save_only_model=False)
        return VLMambaTrainer(
            model=_model(recipe, processor),
            args=args,
            train_dataset=train_dataset,
            data_collator=collator,
            callbacks=list(callbacks),
        )

    full = trainer(tmp_path / "full")
    full.train()
    stopped = trainer(tmp_path / "resumed", callbacks=[_StopAt(3)])
    stopped.train()
    assert stopped.state.global_step == 3
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)  # fp32 tolerance


def test_resume_from_another_config_is_refused(recipe, processor, tmp_path):
    model = _model(recipe, processor)
    model.save_pretrained(tmp_path / "checkpoint-3")
    other = build_model_config(recipe.replace(text_layers=3), processor.tokenizer)
    with pytest.raises(
        ValueError, match=r"different model config.*\n.*num_hidden_layers: checkpoint 2 vs this run 3"
    ):
        check_resume_compatible(tmp_path / "checkpoint-3", other)
    check_resume_compatible(tmp_path / "checkpoint-3", model.config)  # same config: accepted
    trainer = VLMambaTrainer(
        model=VLMambaForConditionalGeneration(other),
        args=_args(tmp_path, recipe),
        train_dataset=ExampleList([_qa()]),
        data_collator=VLMambaDataCollator(processor),
    )
    with pytest.raises(ValueError, match="Refusing to resume"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_gradient_checkpointing_gives_the_same_gradients(recipe, processor, train_dataset):
    batch = VLMambaDataCollator(processor)([train_dataset[i] for i in range(4)])
    grads = []
    for checkpointing in (False, True):
        model = _model(recipe, processor).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.language_model.gradient_checkpointing
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def _train_cli(args, env_extra=None, launcher=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.update(env_extra or {})
    command = (launcher or [sys.executable]) + ["-m", "vlm_mamba_hf.training.train"] + args
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _losses(path):
    return [h["loss"] for h in json.loads(Path(path).read_text()) if "loss" in h]


_COMMON = [
    "--recipe", "tiny", "--max-steps", "4", "--no-eval", "--no-progress", "--threads", "1",
    "--easy-vqa-limit", "120", "--shapes-train-scenes", "20", "--save-steps", "1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_double_batch_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    _train_cli(
        [*_COMMON, "--batch-size", "4", "--output-dir", str(out), "--log-history", str(out / "log.json")]
    )
    return _losses(out / "log.json")


@pytest.mark.slow
def test_torchrun_two_processes_follow_one_process_with_double_batch(
    tmp_path, one_process_double_batch_losses
):
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
    ]
    log = tmp_path / "log.json"
    _train_cli(
        [*_COMMON, "--batch-size", "2", "--output-dir", str(tmp_path), "--log-history", str(log)],
        launcher=torchrun,
    )
    assert json.loads((tmp_path / "final" / "training_summary.json").read_text())["world_size"] == 2
    two = _losses(log)
    assert len(two) == len(one_process_double_batch_losses) == 4
    assert two == pytest.approx(one_process_double_batch_losses, rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU multi-process launch; with CUDA it would use the GPUs"
)
def test_accelerate_launch_two_processes_follow_one_process_with_double_batch(
    tmp_path, one_process_double_batch_losses
):
    # Without CUDA, accelerate's multi-process launcher runs the processes on CPU with gloo (`--cpu` would
    # start a single process).
    accelerate = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518",
    ]  # fmt: skip
    log = tmp_path / "log.json"
    _train_cli(
        [*_COMMON, "--batch-size", "2", "--output-dir", str(tmp_path), "--log-history", str(log)],
        launcher=accelerate,
    )
    assert json.loads((tmp_path / "final" / "training_summary.json").read_text())["world_size"] == 2
    assert _losses(log) == pytest.approx(one_process_double_batch_losses, rel=1e-4)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 arithmetic")
def test_bf16_autocast_trains_on_a_cpu_with_bf16(recipe, processor, train_dataset, tmp_path):
    model = _model(recipe, processor)
    seen = []
    # A Linear inside the language model (training computes the loss without calling lm_head as a module).
    linear = next(m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    args = _args(tmp_path, recipe.replace(max_steps=2, batch_size=4), bf16=True)
    trainer = VLMambaTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=VLMambaDataCollator(processor)
    )
    trainer.train()
    assert torch.bfloat16 in seen
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32

"""Tests of the evaluation metrics against hand-computed values and pycocoevalcap."""

import math
import random

import pytest

from vlm_mamba_hf.data.shapes import make_shapes_split
from vlm_mamba_hf.metrics import (
    caption_exact_match,
    cider_d,
    cider_d_per_example,
    corpus_bleu,
    normalize_vqa_answer,
    tokenize_caption,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),
        ("the Red circle.", "red circle"),
        ("An apple!", "apple"),
        ("none", "0"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("black-and-white", "black and white"),
        ("  yes\n", "yes"),
        ("don't", "dont"),
    ],
)
def test_normalize_vqa_answer_matches_vqa_eval_conventions(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_counts_normalized_exact_matches():
    predictions = ["Two.", "the circle", "blue", "yes"]
    answers = ["two", "circle", "red", "no"]
    assert vqa_accuracy(predictions, answers) == 0.5


def test_vqa_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        vqa_accuracy(["a", "b"], ["a"])


def test_caption_exact_match_ignores_case_and_punctuation_and_accepts_any_reference():
    predictions = ["A red circle on the left.", "a blue square", "a green triangle."]
    references = [["a red circle on the left."], ["a red square.", "a blue square."], "a green circle."]
    assert caption_exact_match(predictions, references) == pytest.approx(2 / 3)


def test_tokenize_caption_lowercases_and_drops_punctuation():
    assert tokenize_caption("A red circle, a Blue square.") == ["a", "red", "circle", "a", "blue", "square"]


def test_bleu_of_identical_corpus_is_one():
    captions = ["a red circle on the left", "two blue squares at the top right"]
    assert corpus_bleu(captions, captions) == pytest.approx(1.0, abs=1e-9)


def test_bleu3_matches_hand_computed_value():
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, equal lengths: (5/6 * 3/5 * 1/4) ** (1/3) = 0.125 ** (1/3) = 0.5.
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"], max_order=3) == pytest.approx(
        0.5
    )


def test_bleu_clips_repeated_ngrams_to_reference_counts():
    assert corpus_bleu(["the the the the"], ["the cat"], max_order=1) == pytest.approx(0.25)


def test_bleu_brevity_penalty_uses_closest_reference_length():
    # Candidate of 3 words, references of 1 and 4 words: the closest is r = 4 (not the shortest, 1),
    # all n-grams match, so BLEU-2 = BP = exp(1 - 4 / 3).
    score = corpus_bleu(["the cat sat"], [["the", "the cat sat on"]], max_order=2)
    assert score == pytest.approx(math.exp(1 - 4 / 3))


def test_cider_d_of_perfect_captions_with_disjoint_words_is_ten():
    # Every caption has 4-grams; a shorter one would score 0 on the orders it lacks.
    captions = ["a red circle left", "two blue squares here", "one green triangle top"]
    assert cider_d(captions, captions) == pytest.approx(10.0)


def test_cider_d_of_one_example_corpus_is_zero():
    # With one document every n-gram has idf log(1 / 1) = 0.
    assert cider_d(["a red circle"], ["a red circle"]) == 0.0


def test_cider_d_penalizes_length_difference():
    references = [["a red circle on the left"], ["a blue square"]]
    short = cider_d_per_example(["a red circle on the left", "a blue square"], references)
    padded = cider_d_per_example(["a red circle on the left", "a blue square " + "x " * 6], references)
    assert padded[0] == short[0]
    assert padded[1] < short[1]


def _random_corpus(seed, size, num_refs, max_prediction_words=12):
    rng = random.Random(seed)
    vocab = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "and", "two", "top"]

    def sentence(max_words):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, max_words)))

    predictions = [sentence(max_prediction_words) for _ in range(size)]
    return predictions, [[sentence(12) for _ in range(num_refs)] for _ in range(size)]


def _shapes_corpus():
    scenes = make_shapes_split("test", 40, seed=0)
    references = [[" ".join(tokenize_caption(s["caption"]))] for s in scenes]
    # A "model" that gets every third caption right and otherwise answers with the next scene's caption.
    predictions = [
        refs[0] if i % 3 == 0 else references[(i + 1) % 40][0] for i, refs in enumerate(references)
    ]
    return predictions, references


_CORPORA = {
    "single_ref": _random_corpus(0, size=8, num_refs=1),
    "five_refs": _random_corpus(1, size=12, num_refs=5),
    "two_examples": _random_corpus(2, size=2, num_refs=3),
    # Short predictions so that the brevity penalty applies.
    "short_predictions": _random_corpus(3, size=10, num_refs=4, max_prediction_words=5),
    "shapes_captions": _shapes_corpus(),
}


@pytest.mark.parametrize("name", sorted(_CORPORA))
def test_bleu_matches_pycocoevalcap(name):
    bleu_module = pytest.importorskip("pycocoevalcap.bleu.bleu")
    predictions, references = _CORPORA[name]
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    expected, _ = bleu_module.Bleu(4).compute_score(gts, res, verbose=0)
    ours = [corpus_bleu(predictions, references, max_order=n, tokenize=False) for n in range(1, 5)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(_CORPORA))
def test_cider_d_matches_pycocoevalcap(name):
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    predictions, references = _CORPORA[name]
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    expected_mean, expected_scores = cider_module.Cider().compute_score(gts, res)
    assert cider_d_per_example(predictions, references, tokenize=False) == pytest.approx(
        list(expected_scores), rel=1e-9, abs=1e-12
    )
    assert cider_d(predictions, references, tokenize=False) == pytest.approx(expected_mean, rel=1e-9)

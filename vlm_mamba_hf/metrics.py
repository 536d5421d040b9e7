"""Evaluation metrics in pure Python: VQA accuracy, caption exact match, corpus BLEU and CIDEr-D.

BLEU and CIDEr-D follow the COCO caption evaluation code (pycocoevalcap's `Bleu` with the "closest"
reference length and `Cider`, which is CIDEr-D: clipped n-gram TF-IDF vectors, document frequencies
from the references of the evaluated corpus, gaussian length penalty, x10). They score whitespace
tokens; pass strings through `tokenize_caption` (the default) in place of the Java PTB tokenizer.

References may be given per example as one string or as a list of strings.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

References = Sequence[str | Sequence[str]]

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
# A period is punctuation unless it sits between two digits ("2.5").
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_APOSTROPHE = re.compile(r"['`\u2019]")
_PUNCTUATION = re.compile(r"[^\w\s.]")


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer as the VQA evaluation does: "Two dogs!" -> "2 dogs", "the red" -> "red".

    Lowercase, drop punctuation (keeping decimal points and joining "1,000"), map number words
    zero..ten to digits, drop the articles a/an/the. Apostrophes are dropped, so "don't" == "dont".
    """
    text = answer.lower().replace("\n", " ").replace("\t", " ")
    text = _DIGIT_COMMA.sub("", text)
    text = _APOSTROPHE.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer after `normalize_vqa_answer`."""
    _check_lengths(predictions, answers)
    hits = sum(normalize_vqa_answer(p) == normalize_vqa_answer(a) for p, a in zip(predictions, answers))
    return hits / len(predictions)


def tokenize_caption(caption: str) -> list[str]:
    """Lowercase word tokens without punctuation, a stand-in for the PTB tokenizer: "A red circle." -> [a, red, circle]."""
    text = _APOSTROPHE.sub("", caption.lower())
    return re.sub(r"[^\w\s]", " ", text).split()


def caption_exact_match(predictions: Sequence[str], references: References) -> float:
    """Fraction of predictions whose tokens equal those of one of their references."""
    refs = _as_reference_lists(predictions, references)
    hits = sum(tokenize_caption(p) in [tokenize_caption(r) for r in rs] for p, rs in zip(predictions, refs))
    return hits / len(predictions)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references; they must match one to one."
        )
    if not predictions:
        raise ValueError("Cannot score an empty corpus: got no predictions.")


def _as_reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    _check_lengths(predictions, references)
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, rs in enumerate(refs):
        if not rs:
            raise ValueError(f"Example {i} has no reference; every example needs at least one.")
    return refs


def _tokens(text: str, tokenize: bool) -> list[str]:
    return tokenize_caption(text) if tokenize else text.split()


def _ngram_counts(words: list[str], max_order: int) -> Counter:
    return Counter(
        tuple(words[i : i + k]) for k in range(1, max_order + 1) for i in range(len(words) - k + 1)
    )


def corpus_bleu(
    predictions: Sequence[str], references: References, max_order: int = 4, tokenize: bool = True
) -> float:
    """Corpus BLEU-max_order as in the COCO caption evaluation.

    Clipped n-gram matches (each n-gram counted at most as often as in the reference that has it
    most) and candidate n-grams are summed over the corpus; the reference length of each example is
    the one closest to its candidate (ties: the shorter); brevity penalty exp(1 - r / c) when c < r.
    """
    refs = _as_reference_lists(predictions, references)
    # pycocoevalcap's smoothing constants: a zero precision gives a tiny score instead of log(0).
    tiny, small = 1e-15, 1e-9
    correct = [0] * max_order
    guess = [0] * max_order
    cand_len = ref_len = 0
    for prediction, example_refs in zip(predictions, refs):
        hyp = _tokens(prediction, tokenize)
        ref_tokens = [_tokens(r, tokenize) for r in example_refs]
        max_ref_counts: Counter = Counter()
        for ref in ref_tokens:
            max_ref_counts |= _ngram_counts(ref, max_order)
        for ngram, count in _ngram_counts(hyp, max_order).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for k in range(max_order):
            guess[k] += max(0, len(hyp) - k)
        cand_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
    log_precision = sum(math.log((c + tiny) / (g + small)) for c, g in zip(correct, guess)) / max_order
    ratio = (cand_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return brevity * math.exp(log_precision)


def cider_d_per_example(
    predictions: Sequence[str],
    references: References,
    max_order: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> list[float]:
    """CIDEr-D score of each example, as pycocoevalcap's `Cider` (CIDEr-D) computes it.

    Per n: TF-IDF vectors of n-grams (document frequency = number of examples whose references
    contain the n-gram), cosine with the candidate's weights clipped at the reference's, times
    exp(-(l_cand - l_ref)^2 / (2 sigma^2)); averaged over n = 1..max_order and references, x10.
    """
    refs = _as_reference_lists(predictions, references)
    hyp_counts = [_ngram_counts(_tokens(p, tokenize), max_order) for p in predictions]
    ref_counts = [[_ngram_counts(_tokens(r, tokenize), max_order) for r in rs] for rs in refs]
    document_frequency: Counter = Counter()
    for counts in ref_counts:
        document_frequency.update({ngram for c in counts for ngram in c})
    log_num_docs = math.log(len(predictions))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(max_order)]
        for ngram, tf in counts.items():
            vectors[len(ngram) - 1][ngram] = tf * (
                log_num_docs - math.log(max(1.0, document_frequency[ngram]))
            )
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
        # pycocoevalcap measures length as the number of bigrams; it differs from the word count by
        # the same 1 for every non-empty caption, so the length difference is the same.
        length = sum(counts[g] for g in vectors[1]) if max_order > 1 else 0
        return vectors, norms, length

    scores = []
    for hyp, example_refs in zip(hyp_counts, ref_counts):
        hyp_vec, hyp_norm, hyp_len = tfidf(hyp)
        total = 0.0
        for ref in example_refs:
            ref_vec, ref_norm, ref_len = tfidf(ref)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for n in range(max_order):
                dot = sum(
                    min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in hyp_vec[n].items()
                )
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    dot /= hyp_norm[n] * ref_norm[n]
                total += dot * penalty
        scores.append(10.0 * total / (max_order * len(example_refs)))
    return scores


def cider_d(
    predictions: Sequence[str],
    references: References,
    max_order: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_per_example` (x10 scale, as reported in papers)."""
    scores = cider_d_per_example(predictions, references, max_order, sigma, tokenize)
    return sum(scores) / len(scores)

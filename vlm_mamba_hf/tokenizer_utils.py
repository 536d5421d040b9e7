"""Train a small byte-level BPE tokenizer for VLM-Mamba (tests, toy data sets, training recipes)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)
# Byte-level BPE starts from the 256 byte symbols, then the special tokens take ids 0..4.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    min_frequency: int = 2,
    lowercase: bool = False,
    image_token: str = IMAGE_TOKEN,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    Byte-level BPE encodes any string without unknown tokens, and decoding gives back the exact input text
    (`decode(encode(s)) == s`, spaces and punctuation included) unless `lowercase=True`, which lowercases
    the input first. Special tokens get the first ids: `<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3,
    `<image>`=4; `<image>` is a special token (never split, dropped by `skip_special_tokens=True`) and is
    also exposed as `tokenizer.image_token` / `tokenizer.image_token_id`. No token is added automatically
    when encoding (no BOS/EOS template).

    Args:
        texts: training corpus (any iterable of strings, read once).
        vocab_size: final vocabulary size, special tokens included; at least 261 (256 bytes + 5 specials).
        min_frequency: minimum pair count for a BPE merge.
        lowercase: lowercase the text before tokenizing (decoding then returns lowercase text).
        image_token: the image placeholder token.
        padding_side: default padding side; "left" suits batched generation.

    Returns:
        A `PreTrainedTokenizerFast` whose `model_input_names` are `["input_ids", "attention_mask"]`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} entries "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)."
        )
    special_tokens = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, image_token]

    backend = Tokenizer(models.BPE())
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens={"image_token": image_token},
        model_input_names=["input_ids", "attention_mask"],
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


__all__ = ["build_tokenizer"]

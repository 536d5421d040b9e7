"""Data collator for VLMamba fine-tuning: (image, prompt, answer) and chat examples -> model batches.

The text follows the processor's chat template exactly ("USER: <image>\\n{prompt} ASSISTANT: {answer}<eos>",
turns joined by a space), so a model trained with this collator answers prompts built by
`VLMambaProcessor.apply_chat_template(..., add_generation_prompt=True)` or by `format_prompt`.

Labels are the input ids with -100 on everything that is not an assistant answer: the prompt, the
"ASSISTANT:" prefix, the image tokens and the padding. The answer's leading space, its tokens and the
closing `<eos>` are supervised, so generation stops after the answer.

Use it with `Trainer(..., args=TrainingArguments(remove_unused_columns=False, ...))`: the examples carry
"image"/"prompt"/"answer" (or "messages"/"images") keys that are not model inputs, and Trainer's default
`remove_unused_columns=True` would drop them before they reach the collator (the collator then raises an
error that says so).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "ASSISTANT:"


def format_prompt(question: str, image_token: str = "<image>", with_image: bool = True) -> str:
    """The single-turn generation prompt: "USER: <image>\\n{question} ASSISTANT:" (the chat template's)."""
    image = image_token + "\n" if with_image else ""
    return f"{USER_PREFIX}{image}{question} {ASSISTANT_PREFIX}"


def example_to_messages(example: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Normalise one example to (chat messages, images).

    Accepted forms:
      {"image": img or None, "prompt" (or "question"): str, "answer": str}
      {"messages": [{"role": ..., "content": str or [{"type": "image"}, {"type": "text", "text": ...}]}],
       "images": [img, ...] (or "image": img)}
    An image given without an image item in the messages is placed at the start of the first user turn.
    """
    if "messages" in example:
        messages = list(example["messages"])
        images = example.get("images")
        if images is None:
            images = [] if example.get("image") is None else [example["image"]]
        images = list(images)
        n_items = sum(
            1
            for m in messages
            if not isinstance(m["content"], str)
            for item in m["content"]
            if item.get("type") == "image"
        )
        if images and n_items == 0:
            first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError("A chat example with images needs a user turn to put them in.")
            content = messages[first_user]["content"]
            content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            messages[first_user] = {
                "role": "user",
                "content": [{"type": "image"} for _ in images] + content,
            }
        elif n_items != len(images):
            raise ValueError(
                f"A chat example has {n_items} image item(s) in its messages but {len(images)} image(s)."
            )
        return messages, images

    prompt = example.get("prompt", example.get("question"))
    if prompt is None or "answer" not in example:
        keys = sorted(example)
        hint = (
            " If you train with `Trainer`, set `TrainingArguments(remove_unused_columns=False)`: otherwise "
            "Trainer drops the example's keys before they reach the collator."
            if set(keys) <= {"input_ids", "attention_mask", "labels", "pixel_values"}
            else ""
        )
        raise ValueError(
            f"An example needs 'prompt' (or 'question') and 'answer', or 'messages'; got keys {keys}.{hint}"
        )
    image = example.get("image")
    content: list[dict[str, Any]] = [] if image is None else [{"type": "image"}]
    content.append({"type": "text", "text": prompt})
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": str(example["answer"])},
    ]
    return messages, ([] if image is None else [image])


def _render(content: str | list[dict[str, Any]], image_token: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        if item.get("type") == "image":
            parts.append(image_token + "\n")
        elif item.get("type") == "text":
            parts.append(item["text"])
        else:
            raise ValueError(f"Unsupported content type {item.get('type')!r}: use 'text' or 'image'.")
    return "".join(parts)


def chat_segments(messages: Sequence[dict[str, Any]], image_token: str) -> list[tuple[str, bool]]:
    """Split a chat into (text, supervised) segments whose concatenation is the chat template's rendering.

    The supervised segments are the assistant answers with their leading space (the eos is added by the
    caller as a token id). Segment boundaries sit at pre-token boundaries of byte-level BPE (before a
    space), so tokenizing segment by segment gives the same ids as tokenizing the whole text.
    """
    segments: list[tuple[str, bool]] = []
    pending = ""
    for index, message in enumerate(messages):
        sep = "" if index == 0 else " "
        role = message["role"]
        if role == "assistant":
            pending += sep + ASSISTANT_PREFIX
            segments.append((pending, False))
            segments.append((" " + _render(message["content"], image_token).strip(), True))
            pending = ""
        elif role == "user":
            pending += sep + USER_PREFIX + _render(message["content"], image_token)
        elif role == "system":
            pending += sep + "SYSTEM: " + _render(message["content"], image_token)
        else:
            raise ValueError(f"Unsupported role {role!r}: use 'system', 'user' or 'assistant'.")
    if pending:
        segments.append((pending, False))
    return segments


def _decode_image(image: Any) -> PIL.Image.Image | Any:
    """Open paths and force-decode PIL images, so that a broken file fails here and not in the batch."""
    if isinstance(image, (str, os.PathLike)):
        with PIL.Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, PIL.Image.Image):
        image.load()
    return image


@dataclass
class VLMambaDataCollator:
    """Batch (image, prompt, answer) or chat examples into input_ids, attention_mask, labels, pixel_values.

    Args:
        processor: a `VLMambaProcessor` (its tokenizer, image processor, image token and image_seq_length).
        max_length: longest sequence in tokens, image tokens included; longer examples lose the end of their
            answers (logged as a warning and counted in `stats["truncated"]`). Image tokens are never cut.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        input_noise: optional `f(ids, labels) -> ids` applied to each example after tokenization. It may
            replace input ids at answer positions only, never their labels: the model then learns to predict
            each next token without trusting the one before it (`data.shapes.ShapeWordSwap` does this for
            shape words, so that the colour after "a square in" comes from the image, not from "square").

    Examples whose image cannot be decoded, or with nothing left to supervise after truncation, are skipped
    with a logged warning and counted in `stats`. Examples without an image are text-only examples.
    Padding is on the right (training); `labels` are -100 on prompt, image and padding positions.
    """

    processor: Any
    max_length: int | None = 512
    pad_to_multiple_of: int | None = None
    input_noise: Callable[[list[int], list[int]], list[int]] | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {"examples": 0, "skipped_images": 0, "skipped_empty": 0, "truncated": 0}
    )

    def __post_init__(self) -> None:
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.image_token = self.processor.image_token
        self.image_token_id = self.processor.image_token_id
        self.image_seq_length = self.processor.image_seq_length
        if self.tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no eos token: answers need one so that generation stops.")
        self.pad_token_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Token ids and labels of one chat, each `<image>` expanded to `image_seq_length` image tokens."""
        ids: list[int] = []
        labels: list[int] = []
        for text, supervised in chat_segments(messages, self.image_token):
            seg = self.tokenizer.encode(text, add_special_tokens=False)
            if supervised:
                seg = [*seg, self.tokenizer.eos_token_id]
                ids += seg
                labels += seg
                continue
            for token in seg:
                count = self.image_seq_length if token == self.image_token_id else 1
                ids += [token] * count
                labels += [IGNORE_INDEX] * count
        return ids, labels

    def _apply_noise(self, ids: list[int], labels: list[int]) -> list[int]:
        noisy = list(self.input_noise(list(ids), labels))
        changed = [t for t, (a, b) in enumerate(zip(ids, noisy)) if a != b]
        if len(noisy) != len(ids) or any(labels[t] == IGNORE_INDEX for t in changed):
            raise ValueError(
                "input_noise must return as many ids as it was given and change answer positions only "
                "(labels != -100); it changed the length or a prompt, image or padding position."
            )
        if any(noisy[t] == self.image_token_id for t in changed):
            raise ValueError(
                "input_noise wrote the image token into an answer; the model would then count more image "
                "tokens than the images have features. Draw replacements from ordinary text tokens."
            )
        return noisy

    def _truncate(self, ids: list[int], labels: list[int], n_images: int) -> tuple[int, int]:
        """Length to keep and images kept: cut at max_length, never inside a run of image tokens."""
        if self.max_length is None or len(ids) <= self.max_length:
            return len(ids), n_images
        cut = self.max_length
        kept_images = 0
        position = 0
        while position < len(ids):
            if ids[position] != self.image_token_id:
                position += 1
                continue
            end = position + self.image_seq_length
            if end > cut:
                cut = min(cut, position)
                break
            kept_images += 1
            position = end
        return cut, kept_images

    def _warn(self, message: str, *args: Any) -> None:
        logger.warning(message, *args)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[tuple[list[int], list[int]]] = []
        images: list[Any] = []
        for feature in features:
            messages, example_images = example_to_messages(feature)
            try:
                decoded = [_decode_image(image) for image in example_images]
            except (OSError, SyntaxError, ValueError) as error:
                self.stats["skipped_images"] += 1
                self._warn(
                    "Skipped an example whose image could not be decoded (%s: %s); %d skipped so far.",
                    type(error).__name__,
                    error,
                    self.stats["skipped_images"],
                )
                continue
            ids, labels = self.encode(messages)
            if self.input_noise is not None:
                ids = self._apply_noise(ids, labels)
            length, kept_images = self._truncate(ids, labels, len(decoded))
            if length < len(ids):
                ids, labels = ids[:length], labels[:length]
                decoded = decoded[:kept_images]
                self.stats["truncated"] += 1
                self._warn(
                    "An example is longer than max_length=%d tokens: its answer was truncated to fit "
                    "(%d truncated so far). Raise max_length to keep whole answers.",
                    self.max_length,
                    self.stats["truncated"],
                )
            # A causal LM predicts labels[1:] from the positions before them: position 0 is never a target.
            if all(label == IGNORE_INDEX for label in labels[1:]):
                self.stats["skipped_empty"] += 1
                self._warn(
                    "Skipped an example with no answer token left to train on (empty answer, or "
                    "max_length=%s cuts into the prompt); %d skipped so far.",
                    self.max_length,
                    self.stats["skipped_empty"],
                )
                continue
            rows.append((ids, labels))
            images += decoded
            self.stats["examples"] += 1
        if not rows:
            raise ValueError(
                f"Every example of this batch was skipped (collator stats: {self.stats}); see the warnings above."
            )

        longest = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        label_tensor = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, (ids, labels) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            label_tensor[row, : len(labels)] = torch.tensor(labels)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}
        if images:
            pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
            batch["pixel_values"] = pixel_values
        return batch


__all__ = [
    "IGNORE_INDEX",
    "VLMambaDataCollator",
    "chat_segments",
    "example_to_messages",
    "format_prompt",
]

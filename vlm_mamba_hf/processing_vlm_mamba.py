"""Processor for VLM-Mamba: image processor + tokenizer, image-token expansion, chat template."""

from __future__ import annotations

import re

from transformers import processing_utils
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack

from .image_processing_vlm_mamba import flatten_images

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_SEQ_LENGTH = 196  # (224 / 16) ** 2 patches

# Renders "USER: <image>\nWhat color is the shape? ASSISTANT: red<eos>". Content is a string or a list of
# {"type": "text", "text": ...} / {"type": "image"} items; each image item becomes "<image>\n". The assistant
# part is wrapped in {% generation %} so that `return_assistant_tokens_mask=True` can mask the prompt.
DEFAULT_CHAT_TEMPLATE = """
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'image' -%}
                {{- '<image>\\n' -}}
            {%- elif item['type'] == 'text' -%}
                {{- item['text'] -}}
            {%- else -%}
                {{- raise_exception("Unsupported content type '" ~ item['type'] ~ "': use 'text' or 'image'.") -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
    {%- if not loop.first -%}
        {{- ' ' -}}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {{- 'SYSTEM: ' + render_content(message['content']) -}}
    {%- elif message['role'] == 'user' -%}
        {{- 'USER: ' + render_content(message['content']) -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' -}}
        {%- generation -%}
            {{- render_content(message['content']) + (eos_token or '') -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception("Unsupported role '" ~ message['role'] ~ "': use 'system', 'user' or 'assistant'.") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if messages -%}
        {{- ' ' -}}
    {%- endif -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""


class VLMambaProcessor(ProcessorMixin):
    r"""Processor for VLM-Mamba: wraps a [`VLMambaImageProcessor`] and a tokenizer.

    Text conventions:
    - Each `image_token` ("<image>") in the text stands for one image, in order, and is expanded to exactly
      `image_seq_length` copies of itself, the positions where the model writes the vision features.
    - A text sample that has images but no `image_token` gets them prefixed: one `image_token` at the start of
      the sample (one per image of the sample when `images` is nested, one list per sample). The model's
      convention is that image features come before the text.
    - `images` without `text` (captioning): each sample's text is just its image token(s).
    - The number of image tokens must match the number of images, otherwise a `ValueError` names both counts.

    Padding is on the left by default (batched generation); pass `padding_side="right"` to the constructor or
    to a call to change it. Returns `input_ids`, `attention_mask` and `pixel_values` (float32, `(n_images, 3,
    height, width)`).

    Args:
        image_processor (`VLMambaImageProcessor`): the image processor.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer; it must encode `image_token` as one token.
        chat_template (`str`, *optional*): Jinja chat template; defaults to a "USER: ... ASSISTANT:" template.
        image_token (`str`, defaults to `"<image>"`): the image placeholder token.
        image_seq_length (`int`, defaults to 196): number of vision features (image tokens) per image; must
            equal the model's number of image features.
        padding_side (`str`, defaults to `"left"`): set on the tokenizer; `None` leaves the tokenizer as it is.
    """

    # Processor-level defaults (lowest priority; call kwargs override them). Padding makes batches work out of
    # the box; token type ids are not a model input.
    text_kwargs = {"padding": True, "return_token_type_ids": False}

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        image_seq_length: int = DEFAULT_IMAGE_SEQ_LENGTH,
        padding_side: str | None = "left",
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("VLMambaProcessor needs both an `image_processor` and a `tokenizer`.")
        if (
            isinstance(image_seq_length, bool)
            or not isinstance(image_seq_length, int)
            or image_seq_length < 1
        ):
            raise ValueError(
                f"`image_seq_length` must be a positive int (vision features per image); got {image_seq_length!r}."
            )
        if padding_side not in ("left", "right", None):
            raise ValueError(f'`padding_side` must be "left", "right" or None; got {padding_side!r}.')

        token_ids = tokenizer.encode(image_token, add_special_tokens=False)
        unk_id = getattr(tokenizer, "unk_token_id", None)
        if len(token_ids) != 1 or (unk_id is not None and token_ids[0] == unk_id):
            raise ValueError(
                f"The tokenizer does not encode {image_token!r} as one token (got ids {token_ids}). Add it with "
                f"`tokenizer.add_special_tokens({{'extra_special_tokens': [{image_token!r}]}})` and resize the "
                "model's token embeddings."
            )
        if padding_side is not None:
            tokenizer.padding_side = padding_side

        self.image_token = image_token
        self.image_token_id = token_ids[0]
        self.image_seq_length = image_seq_length
        self.padding_side = padding_side
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE.replace(DEFAULT_IMAGE_TOKEN, image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def _count_image_tokens(self, sample: str, sanitize_control_tokens: bool = False) -> int:
        """Image tokens in `sample`, leaving out user text marked by `apply_chat_template(sanitize_control_tokens=True)`."""
        marked = getattr(processing_utils, "_MARKED_RE", None)
        if sanitize_control_tokens and marked is not None:
            sample = marked.sub("", sample)
        return len(re.findall(re.escape(self.image_token), sample))

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Load image paths, build captioning prompts for image-only calls, and prefix missing image tokens."""
        if videos is not None or audio is not None:
            raise ValueError(
                "VLMambaProcessor handles images and text only; `videos` and `audio` are not supported."
            )
        per_sample = None
        if images is not None:
            images = self.image_processor.fetch_images(images)
            flat, per_sample = flatten_images(images)
            if not flat:
                images = per_sample = None

        if text is None:
            if images is None:
                raise ValueError("VLMambaProcessor needs `images`, `text`, or both; got neither.")
            counts = per_sample if per_sample is not None else [1] * len(flat)
            return images, [self.image_token * count for count in counts], None, None

        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not all(isinstance(sample, str) for sample in text):
            raise ValueError(f"`text` must be a string or a list of strings; got {type(text).__name__}.")
        text = list(text)
        if not text:
            raise ValueError("`text` is an empty list. Pass at least one prompt.")
        if images is None:
            return None, text, None, None

        if per_sample is not None and len(per_sample) != len(text):
            raise ValueError(
                f"`images` has one list per sample for {len(per_sample)} samples, but `text` has {len(text)} "
                "samples. Pass one list of images per text sample."
            )
        sanitize = bool(kwargs.get("sanitize_control_tokens"))
        for index, sample in enumerate(text):
            n_images = 1 if per_sample is None else per_sample[index]
            if n_images and self._count_image_tokens(sample, sanitize) == 0:
                text[index] = self.image_token * n_images + sample
        return images, text, None, None

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Check that image tokens and images agree, and that every sample has something to encode."""
        for index, sample in enumerate(text):
            if not sample:
                raise ValueError(
                    f"Text sample {index} is empty and comes with no image: there is nothing to encode. Pass a "
                    "non-empty prompt or an image."
                )
        sanitize = bool(kwargs.get("sanitize_control_tokens"))
        counts = [self._count_image_tokens(sample, sanitize) for sample in text]
        if images is None:
            if sum(counts):
                raise ValueError(
                    f"The text contains {sum(counts)} {self.image_token} token(s) but no images were passed. Pass "
                    f"`images=` (one per {self.image_token}), or remove the {self.image_token} tokens."
                )
            return

        flat, per_sample = flatten_images(images)
        if sum(counts) != len(flat):
            raise ValueError(
                f"The number of {self.image_token} tokens ({sum(counts)}) does not match the number of images "
                f"({len(flat)}). Each {self.image_token} in the text stands for one image, in order; a text sample "
                f"without any {self.image_token} gets its image token(s) prefixed automatically."
            )
        if per_sample is not None:
            for index, (n_tokens, n_images) in enumerate(zip(counts, per_sample)):
                if n_tokens != n_images:
                    raise ValueError(
                        f"Sample {index}: the number of {self.image_token} tokens ({n_tokens}) does not match the "
                        f"number of images ({n_images})."
                    )

    def _process_images(self, images, **kwargs):
        image_seq_length = kwargs.pop("image_seq_length", None) or self.image_seq_length
        processed_images = self.image_processor(images, **kwargs)
        n_images = len(processed_images["pixel_values"])
        return processed_images, [self.image_token * image_seq_length] * n_images

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """Expansion of one image placeholder: `image_seq_length` image tokens."""
        return self.image_token * self.image_seq_length

    def __call__(
        self, images=None, text=None, videos=None, audio=None, **kwargs: Unpack[ProcessingKwargs]
    ) -> BatchFeature:
        """Encode images and/or text for the model.

        Args:
            images: one image, a list of images, or one list of images per sample (see
                [`VLMambaImageProcessor`] for the accepted types).
            text (`str` or `list[str]`, *optional*): prompts; see the class docstring for the image-token rules.
            **kwargs: tokenizer kwargs (`padding`, `truncation`, `max_length`, `padding_side`, ...), image
                processor kwargs, `image_seq_length`, and `return_tensors`; unknown kwargs are ignored with a warning.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, when images are given, `pixel_values`.
        """
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens: bool = True, **kwargs
    ) -> list[str]:
        """Decode generated token ids `(batch, seq_len)` or `(seq_len,)` to a list of strings."""
        sequences = (
            generated_outputs.tolist() if hasattr(generated_outputs, "tolist") else list(generated_outputs)
        )
        if sequences and not isinstance(sequences[0], (list, tuple)):
            sequences = [sequences]
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image (the same for every image size, since images are resized)."""
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.image_seq_length] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["VLMambaProcessor", "DEFAULT_CHAT_TEMPLATE"]

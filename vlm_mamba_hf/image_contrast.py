"""Image-contrastive decoding: let the image, not the language prior, pick between plausible tokens.

A caption model learns from its training text which words follow which. Where the image disagrees with that
prior (a red square, when "square in" was never followed by "red" in training), greedy decoding often writes
what the prior expects. Image-contrastive decoding (the idea of visual contrastive decoding, Leng et al.,
2024) runs the model a second time on a *contrast image* that carries no content (every pixel the image's
per-channel median, so the same overall colour and no objects) and decodes from

    (1 + alpha) * log p(token | image, text) - alpha * log p(token | contrast image, text)

which rewards tokens that the image makes more likely than the text alone does. Only tokens that are
plausible under the real image take part: those with p >= `plausibility` x the most likely token's p (the
rest are ruled out), so the contrast can reorder likely candidates but never promotes a token the model
itself finds implausible.

Turn it on per call (`model.generate(..., image_contrast=1.0)`) or for a checkpoint in its
`generation_config.json` (`"image_contrast": 1.0`, optionally `"image_contrast_plausibility": 0.1`), which
`pipeline("image-text-to-text")` then follows. It costs a second forward pass per step (the contrast branch
keeps its own recurrent state, so decoding stays linear in length). Calls without images decode as usual.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from transformers import LogitsProcessor

# Generation-config attributes (and `generate()` keyword arguments) read by `VLMambaForConditionalGeneration`.
ALPHA_KEY = "image_contrast"
PLAUSIBILITY_KEY = "image_contrast_plausibility"
DEFAULT_PLAUSIBILITY = 0.1


def median_colour(pixel_values: torch.Tensor) -> torch.Tensor:
    """(..., channels, height, width) -> (..., channels): each image's per-channel median value (the lower
    middle value for an even pixel count); the background colour of a plain-background image. The contrast
    images below and the vision tower's `foreground_map` share it, so a contrast image has no foreground."""
    # contiguous(): on a broadcast (expanded) tensor, median reads the wrong memory (torch 2.13, CPU).
    flat = pixel_values.contiguous().flatten(-2)
    return flat.float().median(dim=-1).values.to(pixel_values.dtype)


def contrast_pixel_values(pixel_values: torch.Tensor) -> torch.Tensor:
    """Content-free contrast images: each image (any leading dims, then channels, height, width) filled with
    its own per-channel median value (`median_colour`)."""
    if pixel_values.dim() < 3:
        raise ValueError(
            f"pixel_values must end in (channels, height, width), got shape {tuple(pixel_values.shape)}."
        )
    return median_colour(pixel_values)[..., None, None].expand_as(pixel_values).contiguous()


def check_contrast_settings(alpha: float, plausibility: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(
            f"{ALPHA_KEY} must be a finite number >= 0 (0 turns image-contrastive decoding off), got {alpha!r}."
        )
    if not (isinstance(plausibility, (int, float)) and 0 < plausibility <= 1):
        raise ValueError(
            f"{PLAUSIBILITY_KEY} must be in (0, 1] (the share of the top token's probability a token needs to "
            f"stay a candidate), got {plausibility!r}."
        )


class ImageContrastLogitsProcessor(LogitsProcessor):
    """Rescores each step's logits against a second pass of `model` on content-free contrast images.

    `input_ids`, `attention_mask` and `pixel_values` are the prompt as passed to `generate()`. The contrast
    branch runs the prompt once with `contrast_pixel_values(pixel_values)` and then feeds each new token to
    its own recurrent state when the model is stateful (`_is_stateful`, as VLMamba is); for other models it
    recomputes the whole sequence every step (correct for any image-text model, quadratic in length).
    Sequences expanded by `num_return_sequences` are handled; beam search is not (the beams reorder, the
    contrast state would not).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        alpha: float = 1.0,
        plausibility: float = DEFAULT_PLAUSIBILITY,
    ) -> None:
        check_contrast_settings(alpha, plausibility)
        self.model = model
        self.prompt_ids = input_ids
        self.prompt_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.pixel_values = contrast_pixel_values(pixel_values)
        self.alpha = float(alpha)
        self.log_plausibility = math.log(plausibility)
        self._cache = None
        self._consumed = 0
        # A recurrent model's state needs no positions, so the contrast branch can step it token by token;
        # a KV-cache model's positions depend on padding bookkeeping that only generate() does.
        self._stateful = bool(getattr(model, "_is_stateful", False))
        parameters = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in parameters
        self._takes_logits_to_keep = "logits_to_keep" in parameters

    def _expand(self, rows: int) -> None:
        """Repeat the prompt for `num_return_sequences` (rows = batch x that), as generate() does."""
        batch = self.prompt_ids.shape[0]
        if rows == batch:
            return
        if rows % batch:
            raise ValueError(f"Cannot match {rows} decoding rows to a prompt batch of {batch}.")
        repeats = rows // batch
        self.prompt_ids = self.prompt_ids.repeat_interleave(repeats, dim=0)
        self.prompt_mask = self.prompt_mask.repeat_interleave(repeats, dim=0)
        if self.pixel_values.shape[0] == batch:
            self.pixel_values = self.pixel_values.repeat_interleave(repeats, dim=0)

    def _full_pass(self, input_ids: torch.LongTensor) -> Any:
        new = input_ids.shape[1] - self.prompt_ids.shape[1]
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(input_ids.shape[0], new)], dim=1)
        inputs = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": self.pixel_values}
        if self._takes_position_ids:
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if self._takes_logits_to_keep:
            inputs["logits_to_keep"] = 1
        return self.model(**inputs, use_cache=self._stateful)

    @torch.no_grad()
    def _contrast_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if self._consumed == 0:
            self._expand(input_ids.shape[0])
            out = self._full_pass(input_ids)
            self._cache = out.cache if self._stateful else None
        elif self._stateful:
            out = self.model(
                input_ids=input_ids[:, self._consumed :], cache=self._cache, use_cache=True, logits_to_keep=1
            )
            self._cache = out.cache
        else:
            out = self._full_pass(input_ids)
        self._consumed = input_ids.shape[1]
        return out.logits[:, -1].float()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.alpha == 0:
            return scores
        contrast = self._contrast_logits(input_ids).log_softmax(-1)
        real = scores.float().log_softmax(-1)
        combined = (1 + self.alpha) * real - self.alpha * contrast
        implausible = real < real.max(dim=-1, keepdim=True).values + self.log_plausibility
        return combined.masked_fill(implausible, -math.inf).to(scores.dtype)

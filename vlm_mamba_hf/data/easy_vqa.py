"""The easy-VQA dataset, read in place from the `easy-vqa` package (64x64 PNGs and question lists).

Nothing is copied or downloaded: the package ships the images and questions. The installed version has
4,000 train and 1,000 test images, 38,575 train and 9,673 test questions, and 13 answers.

Each image holds one shape, filled with one of eight exact colours on a light background.
`easy_vqa_object` reads an image's colour and shape from its pixels. That is the shape's exact colour (the
most common pixel colour other than the background) and the share of its bounding box that the shape
fills: about 1 for a rectangle, 0.7-0.81 for a circle, 0.5-0.68 for a triangle. With it, `exclude_pairs`
drops the images of given colour-shape pairs, so that a training mixture can keep the shape scenes'
held-out pairs out of easy-VQA too (its blue circles, green triangles and red rectangles).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

EASY_VQA_SPLITS: tuple[str, ...] = ("train", "test")
EASY_VQA_ANSWER_TYPES: tuple[str, ...] = ("shape", "colour", "yesno")
EASY_VQA_SHAPES: frozenset[str] = frozenset({"circle", "rectangle", "triangle"})


def _import_easy_vqa() -> ModuleType:
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError(
            'The easy-VQA dataset needs the `easy-vqa` package: pip install "vlm-mamba-hf[data]"'
        ) from error
    return easy_vqa


def easy_vqa_answers() -> list[str]:
    """The answer vocabulary of easy-VQA, in the package's order (13 answers)."""
    return list(_import_easy_vqa().get_answers())


def easy_vqa_answer_type(answer: str) -> str:
    """ "shape" (circle, rectangle, triangle), "yesno", or "colour" (the other easy-VQA answers)."""
    if answer in EASY_VQA_SHAPES:
        return "shape"
    return "yesno" if answer in ("yes", "no") else "colour"


# The exact fill colours of easy-VQA's shapes.
EASY_VQA_COLOURS: dict[tuple[int, int, int], str] = {
    (255, 0, 0): "red",
    (0, 255, 0): "green",
    (0, 0, 255): "blue",
    (0, 0, 0): "black",
    (128, 128, 128): "gray",
    (0, 128, 128): "teal",
    (165, 42, 42): "brown",
    (255, 255, 0): "yellow",
}
# Share of the bounding box a shape fills: rectangles fill it; on the train images circles fill 0.68-0.81
# and triangles 0.50-0.68. Between the two bounds below a shape counts as either.
_RECTANGLE_FILL, _CIRCLE_FILL, _TRIANGLE_FILL = 0.95, 0.72, 0.64


def easy_vqa_object(image: Image.Image) -> tuple[str | None, frozenset[str]]:
    """(colour, possible shapes) of the shape in an easy-VQA image, from its pixels: the colour name (None if
    the most common non-background colour is not one of easy-VQA's) and the shapes its fill ratio allows (one,
    or circle and triangle where the two overlap)."""
    pixels = np.asarray(image.convert("RGB"))
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    if len(colours) < 2:
        return None, frozenset()
    fill = tuple(int(v) for v in colours[np.argsort(-counts)[1]])
    rows, cols = np.nonzero((pixels == np.array(fill, dtype=pixels.dtype)).all(-1))
    ratio = len(rows) / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    if ratio >= _RECTANGLE_FILL:
        shapes = {"rectangle"}
    elif ratio >= _CIRCLE_FILL:
        shapes = {"circle"}
    elif ratio < _TRIANGLE_FILL:
        shapes = {"triangle"}
    else:
        shapes = {"circle", "triangle"}
    return EASY_VQA_COLOURS.get(fill), frozenset(shapes)


def shapes_heldout_pairs() -> frozenset[tuple[str, str]]:
    """The shape scenes' held-out pairs (`shapes.HELDOUT_PAIRS`) in easy-VQA's names (a square is one of
    easy-VQA's rectangles): the pairs to keep out of a training mixture that holds both datasets."""
    from .shapes import HELDOUT_PAIRS

    return frozenset((colour, "rectangle" if shape == "square" else shape) for colour, shape in HELDOUT_PAIRS)


def _decode(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class EasyVQADataset(Dataset):
    """easy-VQA questions of one split as {"image", "question", "answer", "image_id"} examples.

    limit: keep a random subset of that many questions (drawn with `seed`, kept in file order).
    exclude_pairs: (colour, shape) pairs in easy-VQA's names ("red", "rectangle"); images that show one (or
    may: see `easy_vqa_object`; an image whose colour cannot be read counts as showing any) are dropped with
    their questions and counted in `excluded_images` / `excluded_questions`.
    Each image is decoded once, as RGB; images that are missing or fail to decode are skipped,
    with their questions, and counted in `skipped` (and `skipped_questions`) with a logged warning.
    """

    def __init__(
        self,
        split: str = "train",
        limit: int | None = None,
        seed: int = 0,
        exclude_pairs: Collection[tuple[str, str]] = (),
    ) -> None:
        if split not in EASY_VQA_SPLITS:
            raise ValueError(f"Unknown easy-VQA split {split!r}; expected one of {EASY_VQA_SPLITS}.")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be non-negative or None, got {limit}.")
        easy_vqa = _import_easy_vqa()
        if split == "train":
            texts, answers, image_ids = easy_vqa.get_train_questions()
            paths = easy_vqa.get_train_image_paths()
        else:
            texts, answers, image_ids = easy_vqa.get_test_questions()
            paths = easy_vqa.get_test_image_paths()
        self.split = split
        self.answers = easy_vqa_answers()

        indices = range(len(texts))
        if limit is not None and limit < len(texts):
            indices = sorted(random.Random(seed).sample(indices, limit))

        images: dict[int, Image.Image] = {}
        failed: dict[int, str] = {}
        for image_id in dict.fromkeys(image_ids[i] for i in indices):
            path = paths.get(image_id)
            if path is None:
                failed[image_id] = "no image file"
                continue
            try:
                images[image_id] = _decode(path)
            except (OSError, SyntaxError, ValueError) as error:
                failed[image_id] = f"{type(error).__name__}: {error}"

        excluded = set()
        if exclude_pairs:
            pairs = set(exclude_pairs)
            known = set(EASY_VQA_COLOURS.values())
            unknown = {p for p in pairs if p[0] not in known or p[1] not in EASY_VQA_SHAPES}
            if unknown:
                raise ValueError(
                    f"exclude_pairs {sorted(unknown)} are not easy-VQA (colour, shape) pairs; colours are "
                    f"{sorted(known)} and shapes {sorted(EASY_VQA_SHAPES)}."
                )
            for image_id, image in images.items():
                colour, shapes = easy_vqa_object(image)
                if any(colour is None or (colour, shape) in pairs for shape in shapes) or not shapes:
                    excluded.add(image_id)
        kept = {i: image for i, image in images.items() if i not in excluded}
        self.excluded_images = len(excluded)
        self.excluded_questions = sum(image_ids[i] in excluded for i in indices)

        self.examples: list[dict[str, Any]] = [
            {
                "image": kept[image_ids[i]],
                "question": texts[i],
                "answer": answers[i],
                "image_id": image_ids[i],
            }
            for i in indices
            if image_ids[i] in kept
        ]
        self.skipped = len(failed)
        self.skipped_questions = len(indices) - len(self.examples) - self.excluded_questions
        if failed:
            shown = "; ".join(f"image {k}: {v}" for k, v in list(failed.items())[:5])
            logger.warning(
                "easy-VQA %s: skipped %d image(s) that could not be read and their %d question(s) (%s%s)",
                split,
                self.skipped,
                self.skipped_questions,
                shown,
                "; ..." if len(failed) > 5 else "",
            )

    @property
    def num_images(self) -> int:
        """Number of distinct images behind the kept questions."""
        return len({e["image_id"] for e in self.examples})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.examples[index])

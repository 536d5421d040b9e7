"""The easy-VQA dataset, read in place from the `easy-vqa` package (64x64 PNGs and question lists).

Nothing is copied or downloaded: the package ships the images and questions. The installed version has
4,000 train and 1,000 test images, 38,575 train and 9,673 test questions, and 13 answers.
"""

from __future__ import annotations

import logging
import random
from types import ModuleType
from typing import Any

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


def _decode(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class EasyVQADataset(Dataset):
    """easy-VQA questions of one split as {"image", "question", "answer", "image_id"} examples.

    limit: keep a random subset of that many questions (drawn with `seed`, kept in file order).
    Each image is decoded once, as RGB; images that are missing or fail to decode are skipped,
    with their questions, and counted in `skipped` (and `skipped_questions`) with a logged warning.
    """

    def __init__(self, split: str = "train", limit: int | None = None, seed: int = 0) -> None:
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

        self.examples: list[dict[str, Any]] = [
            {
                "image": images[image_ids[i]],
                "question": texts[i],
                "answer": answers[i],
                "image_id": image_ids[i],
            }
            for i in indices
            if image_ids[i] in images
        ]
        self.skipped = len(failed)
        self.skipped_questions = len(indices) - len(self.examples)
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

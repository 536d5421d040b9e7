"""Datasets for training and evaluating the VLM: procedural shape scenes and easy-VQA."""

from .easy_vqa import EASY_VQA_ANSWER_TYPES, EasyVQADataset, easy_vqa_answer_type, easy_vqa_answers
from .shapes import (
    COLORS,
    HELDOUT_PAIRS,
    SHAPES,
    TRAIN_PAIRS,
    ShapesDataset,
    caption_for,
    make_shapes_split,
)

__all__ = [
    "COLORS",
    "EASY_VQA_ANSWER_TYPES",
    "HELDOUT_PAIRS",
    "SHAPES",
    "TRAIN_PAIRS",
    "EasyVQADataset",
    "ShapesDataset",
    "caption_for",
    "easy_vqa_answer_type",
    "easy_vqa_answers",
    "make_shapes_split",
]

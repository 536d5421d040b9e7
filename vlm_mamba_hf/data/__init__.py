"""Datasets for training and evaluating the VLM: procedural shape scenes and easy-VQA."""

from .easy_vqa import EASY_VQA_ANSWER_TYPES, EasyVQADataset, easy_vqa_answer_type, easy_vqa_answers
from .shapes import (
    COLORS,
    HELDOUT_PAIRS,
    OTHER_SHAPES,
    SHAPES,
    TRAIN_PAIRS,
    ShapesDataset,
    ShapeWordSwap,
    caption_for,
    make_any_colour_scenes,
    make_any_shape_scenes,
    make_shapes_split,
    nearest_color_name,
)

__all__ = [
    "COLORS",
    "EASY_VQA_ANSWER_TYPES",
    "HELDOUT_PAIRS",
    "OTHER_SHAPES",
    "SHAPES",
    "TRAIN_PAIRS",
    "EasyVQADataset",
    "ShapeWordSwap",
    "ShapesDataset",
    "caption_for",
    "easy_vqa_answer_type",
    "easy_vqa_answers",
    "make_any_colour_scenes",
    "make_any_shape_scenes",
    "make_shapes_split",
    "nearest_color_name",
]

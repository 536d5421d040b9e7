"""Procedurally drawn shape scenes with template captions and QA pairs, deterministic by seed.

A scene is a small square image with a plain background and 1-3 filled shapes, each in its own cell of
a 3x3 grid, so that every object has an unambiguous position phrase ("at the top left", "in the
center", "on the right", ...). Captions list the objects in reading order of their cells (row by row,
left to right), which makes each scene's caption canonical and exact-match evaluation meaningful.

Held-out split ("heldout"): the (colour, shape) pairs in ``HELDOUT_PAIRS`` (red square, green triangle,
blue circle) never appear in "train", "val" or "test", neither drawn nor named in a caption or a
question. Every "heldout" scene draws at least one of them. Each held-out colour and shape still
appears in training with other partners, so the split measures compositional generalisation: the
model knows "red" and "square" but has never seen a red square. easy-VQA, in the same training mixture, has
its own blue circles, green triangles and red rectangles; a recipe leaves those images out only with
`Recipe.easy_vqa_exclude_heldout` (off by default; `easy_vqa.shapes_heldout_pairs`).

Any-colour scenes (`make_any_colour_scenes`): the same layout with every object in a random RGB colour and
only colour-free text: questions ("what shape is at the top left?", counts) and a description without
colour words ("a square at the top left and a circle on the right."). They teach the image path to see a
shape whatever its colour, so that it recognises a red square it has never seen. They keep the held-out
promise: an object is never drawn in a colour whose nearest palette colour would pair it into
``HELDOUT_PAIRS`` (no square is nearest to palette red), and no colour is named.

Any-shape scenes (`make_any_shape_scenes`), their mirror: the same layout with palette colours on shapes that
are neither circles, squares nor triangles (`OTHER_SHAPES`: plus, cross, star) and only shape-free text:
colour questions ("what color is the shape at the top left?") and the colour description ("red at the top
left and blue on the right."). They teach the image path to see a colour whatever the shape, red included
where no training square is red. No held-out pair is drawn or named in them either.

Captions name each object's shape before its colour ("a square in red at the top left"). In the other
order ("a red square") a caption model learns from its training captions that "red" is never followed by
"square" and, on a held-out red square, writes the shape that that prior allows rather than the one in the
image. Named second, the colour has to override the opposite prior ("square in" is never followed by "red"),
and the image wins that contest far more often: fine-tuning the same model for 1,500 steps on each order,
the shape-first one captioned 129 of 200 held-out scenes exactly against 44 (`vlm_mamba_hf.training.recipes`
notes).

The space of captions is small, so the same caption (with a different image: jittered positions,
sizes and background) can appear in both "train" and "test"; only "heldout" is disjoint by design.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# The shapes of any-shape scenes (`make_any_shape_scenes`): none looks like a circle, square or triangle, and
# none is ever named, so a palette colour drawn on them forms no colour-shape pair.
OTHER_SHAPES: tuple[str, ...] = ("plus", "cross", "star")

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "square"), ("green", "triangle"), ("blue", "circle")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)

SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")

# Cell (row, col) of the 3x3 grid -> position name, as used in questions and captions.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
_PREPOSITIONS = {"left": "on the", "right": "on the", "center": "in the"}

NUMBER_WORDS: tuple[str, ...] = tuple("zero one two three four five six seven eight nine".split())

CAPTION_PROMPT = "Describe the image."
# The prompt of the colour-free description of any-colour scenes.
SHAPES_PROMPT = "Describe the shapes."
# The prompt of the shape-free colour description of palette scenes (`colour_description_for`).
COLOURS_PROMPT = "Describe the colours."

# Shape extent as a fraction of a grid cell; the rest of the cell is room for position jitter.
_MIN_EXTENT, _MAX_EXTENT = 0.55, 0.85
_MIN_IMAGE_SIZE = 24


def position_phrase(position: str) -> str:
    """The prepositional phrase for a position name: "left" -> "on the left", "top" -> "at the top"."""
    return f"{_PREPOSITIONS.get(position, 'at the')} {position}"


def _plural(shape: str) -> str:
    return shape + "s"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# The word between an object's shape and its colour in captions ("square in red").
COLOR_LINK = "in"


def object_phrase(shape: str, color: str | None = None) -> str:
    """How a caption names one object: "square in red" (shape first, see the module docstring), or "square"
    without a colour."""
    return shape if color is None else f"{shape} {COLOR_LINK} {color}"


def caption_for(objects: list[dict[str, Any]], with_colors: bool = True) -> str:
    """Canonical caption of a scene: objects in reading order of their grid cells ("a square in red at the
    top left and a circle in blue on the right."); without the colour words when `with_colors` is False
    (the description of any-colour scenes)."""
    ordered = sorted(objects, key=lambda o: (o["row"], o["col"]))
    names = [_with_article(object_phrase(o["shape"], o["color"] if with_colors else None)) for o in ordered]
    return _listing(names, ordered)


def colour_description_for(objects: list[dict[str, Any]]) -> str:
    """The colours of a scene without its shapes, in reading order ("red at the top left and blue on the
    right."; for `COLOURS_PROMPT`): colour at a position, read in a caption's sequence with no shape word
    before it to lean on."""
    ordered = sorted(objects, key=lambda o: (o["row"], o["col"]))
    return _listing([o["color"] for o in ordered], ordered)


def _listing(names: list[str], ordered: list[dict[str, Any]]) -> str:
    parts = [f"{name} {position_phrase(o['position'])}" for name, o in zip(names, ordered)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def _count_questions(objects: list[dict[str, Any]], shape_counts: Counter) -> list[tuple[str, str]]:
    qa = [("how many shapes are there?", NUMBER_WORDS[len(objects)])]
    return qa + [(f"how many {_plural(s)} are there?", NUMBER_WORDS[shape_counts[s]]) for s in SHAPES]


def questions_for(
    objects: list[dict[str, Any]], rng: random.Random, negative_pairs: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    """Template QA pairs answerable from the objects; absent pairs for "no" answers come from negative_pairs."""
    ordered = sorted(objects, key=lambda o: (o["row"], o["col"]))
    shape_counts = Counter(o["shape"] for o in ordered)
    qa = _count_questions(ordered, shape_counts)
    qa += [(f"what color is the {o['shape']}?", o["color"]) for o in ordered if shape_counts[o["shape"]] == 1]
    for o in ordered:
        phrase = position_phrase(o["position"])
        qa.append((f"what shape is {phrase}?", o["shape"]))
        qa.append((f"what color is the shape {phrase}?", o["color"]))
    # As many "no" as "yes" existence questions; listed in palette order so the order is canonical.
    present = {(o["color"], o["shape"]) for o in ordered}
    absent = [p for p in negative_pairs if p not in present]
    asked = {p: "yes" for p in present}
    asked.update({p: "no" for p in rng.sample(absent, min(len(present), len(absent)))})
    qa += [(f"is there {_with_article(c)} {s}?", asked[(c, s)]) for c, s in ALL_PAIRS if (c, s) in asked]
    return qa


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, half: int, fill: tuple[int, int, int]
) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        # Apex up; the box centre (cx, cy) lies inside (the half-width there is half / 2).
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    elif shape == "plus":
        # Thin arms and a thin cross: thicker ones fill their box like a circle at small sizes.
        arm = max(1, half // 5)
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    elif shape == "cross":
        width = max(2, half // 2)
        draw.line((cx - half, cy - half, cx + half, cy + half), fill=fill, width=width)
        draw.line((cx - half, cy + half, cx + half, cy - half), fill=fill, width=width)
    elif shape == "star":
        # Five points, one straight up; the inner corners at 0.45 of the outer radius.
        corners = []
        for k in range(10):
            radius = half if k % 2 == 0 else 0.45 * half
            angle = math.pi * k / 5
            corners.append((cx + radius * math.sin(angle), cy - radius * math.cos(angle)))
        draw.polygon(corners, fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES + OTHER_SHAPES}.")


def nearest_color_name(rgb: tuple[int, int, int]) -> str:
    """The palette colour (a key of COLORS) closest to an RGB colour in Euclidean RGB distance."""
    return min(COLORS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLORS[name], rgb)))


# Shape -> the colours it is held out with.
_HELDOUT_COLOR_OF: dict[str, set[str]] = {
    shape: {c for c, s in HELDOUT_PAIRS if s == shape} for shape in SHAPES
}
# Smallest RGB distance between an any-colour object and its background, so that every object is visible.
_MIN_CONTRAST = 80


def _random_color(rng: random.Random, shape: str, background: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random visible colour for `shape` whose nearest palette colour does not pair it into HELDOUT_PAIRS."""
    forbidden = _HELDOUT_COLOR_OF[shape]
    while True:
        rgb = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        contrast = sum((a - b) ** 2 for a, b in zip(rgb, background)) ** 0.5
        if contrast >= _MIN_CONTRAST and nearest_color_name(rgb) not in forbidden:
            return rgb


def _place_object(
    rng: random.Random,
    draw: ImageDraw.ImageDraw,
    cell: tuple[int, int],
    shape: str,
    fill: tuple[int, int, int],
    cell_size: float,
) -> dict[str, Any]:
    """Draw `shape` with a random extent and jitter inside its grid cell; the object's description."""
    row, col = cell
    # Geometry is drawn in cell units, so a seed gives the same scene at every image size.
    extent = rng.uniform(_MIN_EXTENT, _MAX_EXTENT)
    slack = (1.0 - extent) / 2
    cx = round((col + 0.5 + rng.uniform(-slack, slack)) * cell_size)
    cy = round((row + 0.5 + rng.uniform(-slack, slack)) * cell_size)
    half = max(1, int(extent * cell_size / 2))
    _draw_shape(draw, shape, cx, cy, half, fill)
    return {
        "shape": shape,
        "row": row,
        "col": col,
        "position": POSITIONS[(row, col)],
        "center": (cx, cy),
        "size": 2 * half,
    }


def _sample_scene(
    rng: random.Random, heldout: bool, image_size: int, min_objects: int, max_objects: int
) -> dict[str, Any]:
    n_objects = rng.randint(min_objects, max_objects)
    cells = rng.sample(sorted(POSITIONS), n_objects)
    background = rng.choice(sorted(BACKGROUNDS))
    cell_size = image_size / 3
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    objects = []
    for i, (row, col) in enumerate(cells):
        pool = sorted(HELDOUT_PAIRS) if heldout and i == 0 else (ALL_PAIRS if heldout else TRAIN_PAIRS)
        color, shape = rng.choice(pool)
        objects.append(
            {**_place_object(rng, draw, (row, col), shape, COLORS[color], cell_size), "color": color}
        )
    objects.sort(key=lambda o: (o["row"], o["col"]))
    negatives = ALL_PAIRS if heldout else TRAIN_PAIRS
    return {
        "image": image,
        "caption": caption_for(objects),
        "qa": questions_for(objects, rng, negatives),
        "objects": objects,
        "background": background,
    }


def _check_scene_args(n: int, image_size: int, min_objects: int, max_objects: int) -> None:
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}.")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE} pixels, got {image_size}.")
    if not 1 <= min_objects <= max_objects <= len(POSITIONS):
        raise ValueError(
            f"Need 1 <= min_objects <= max_objects <= {len(POSITIONS)}, got {min_objects} and {max_objects}."
        )


def make_shapes_split(
    split: str, n: int, seed: int, image_size: int = 64, min_objects: int = 1, max_objects: int = 3
) -> list[dict[str, Any]]:
    """Draw n scenes of a split: dicts {"image", "caption", "qa", "objects", "background"}.

    The same (split, seed) always gives the same scenes, and the first k scenes do not depend on n.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    _check_scene_args(n, image_size, min_objects, max_objects)
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes and platforms.
    rng = random.Random(f"vlm_mamba_hf.shapes/{split}/{seed}")
    heldout = split == "heldout"
    return [_sample_scene(rng, heldout, image_size, min_objects, max_objects) for _ in range(n)]


def shape_questions_for(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Colour-free QA pairs: the shape at each object's position and the counts of shapes."""
    qa = _count_questions(objects, Counter(o["shape"] for o in objects))
    qa += [(f"what shape is {position_phrase(o['position'])}?", o["shape"]) for o in objects]
    return qa


def _draw_scenes(
    rng: random.Random,
    n: int,
    image_size: int,
    min_objects: int,
    max_objects: int,
    shapes: tuple[str, ...],
    colour_of: Callable[[random.Random, str, tuple[int, int, int]], dict[str, Any]],
    describe: Callable[[list[dict[str, Any]]], tuple[str, list[tuple[str, str]]]],
) -> list[dict[str, Any]]:
    """n scenes of 1-3 objects of `shapes` on the 3x3 grid: `colour_of(rng, shape, background_rgb)` gives each
    object's fill ("rgb") and what else its description keeps, `describe(objects)` the scene's caption and
    QA pairs."""
    cell_size = image_size / 3
    scenes = []
    for _ in range(n):
        cells = rng.sample(sorted(POSITIONS), rng.randint(min_objects, max_objects))
        background = rng.choice(sorted(BACKGROUNDS))
        image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
        draw = ImageDraw.Draw(image)
        objects = []
        for cell in cells:
            shape = rng.choice(shapes)
            colour = colour_of(rng, shape, BACKGROUNDS[background])
            objects.append({**_place_object(rng, draw, cell, shape, colour["rgb"], cell_size), **colour})
        objects.sort(key=lambda o: (o["row"], o["col"]))
        caption, qa = describe(objects)
        scenes.append(
            {"image": image, "caption": caption, "qa": qa, "objects": objects, "background": background}
        )
    return scenes


def make_any_colour_scenes(
    n: int, seed: int, image_size: int = 64, min_objects: int = 1, max_objects: int = 3
) -> list[dict[str, Any]]:
    """Draw n training scenes whose objects have random RGB colours: dicts {"image", "caption", "qa",
    "objects", "background"}, with a colour-free caption ("a square at the top left and a circle on the
    right.", for `SHAPES_PROMPT`) and colour-free questions only (see the module docstring). Deterministic by
    seed."""
    _check_scene_args(n, image_size, min_objects, max_objects)

    def colour_of(rng: random.Random, shape: str, background: tuple[int, int, int]) -> dict[str, Any]:
        return {"rgb": _random_color(rng, shape, background)}

    def describe(objects: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]]]:
        return caption_for(objects, with_colors=False), shape_questions_for(objects)

    rng = random.Random(f"vlm_mamba_hf.shapes/any_colour/{seed}")
    return _draw_scenes(rng, n, image_size, min_objects, max_objects, SHAPES, colour_of, describe)


def colour_questions_for(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Shape-free QA pairs: the number of objects and the colour at each object's position."""
    qa = [("how many shapes are there?", NUMBER_WORDS[len(objects)])]
    qa += [(f"what color is the shape {position_phrase(o['position'])}?", o["color"]) for o in objects]
    return qa


def make_any_shape_scenes(
    n: int, seed: int, image_size: int = 64, min_objects: int = 1, max_objects: int = 3
) -> list[dict[str, Any]]:
    """Draw n training scenes of palette-coloured objects in `OTHER_SHAPES`: dicts {"image", "caption", "qa",
    "objects", "background"}, with the shape-free colour description as caption ("red at the top left and
    blue on the right.", for `COLOURS_PROMPT`) and shape-free questions only. Deterministic by seed.

    The mirror of the any-colour scenes: those show every shape in every colour without naming the colour, so
    that shape is read whatever the colour; these show every palette colour on shapes that are never circles,
    squares or triangles, so that colour is read whatever the shape, red included where no training square is
    red. No held-out pair is drawn or named."""
    _check_scene_args(n, image_size, min_objects, max_objects)
    colours = sorted(COLORS)

    def colour_of(rng: random.Random, shape: str, background: tuple[int, int, int]) -> dict[str, Any]:
        color = rng.choice(colours)
        return {"rgb": COLORS[color], "color": color}

    def describe(objects: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]]]:
        return colour_description_for(objects), colour_questions_for(objects)

    rng = random.Random(f"vlm_mamba_hf.shapes/any_shape/{seed}")
    return _draw_scenes(rng, n, image_size, min_objects, max_objects, OTHER_SHAPES, colour_of, describe)


class ShapeWordSwap:
    """Collator `input_noise`: in answers, a shape word that a colour follows ("square in red") is replaced,
    with probability `probability`, by another shape in the input ids (the labels keep the true word).

    A caption model learns from its training captions that "square in" is never followed by "red" (a held-out
    pair) and may trust that more than the image. With the shape word sometimes wrong, the word before the
    colour stops being evidence for it and the model reads the colour from the image. The replacement never
    forms a held-out pair with the colour that follows, so no held-out pair is ever written in training.
    Colours, shapes and "in" must each be one token (with the leading space), as they are in the recipes'
    tokenizers.

    The draws are a function of `seed` and the example's token ids, not of a generator's state: the same
    example gets the same replacement in every epoch, and a run resumed from a checkpoint sees exactly the
    noise that the uninterrupted run saw (the data loader collates a batch ahead of the step that
    `Trainer` checkpoints, so state-based draws would shift by one batch on resume).
    """

    def __init__(self, tokenizer: Any, probability: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}.")
        self.probability = probability
        self.seed = seed
        self.color_ids = {self._single_id(tokenizer, c): c for c in COLORS}
        self.shape_ids = {self._single_id(tokenizer, s): s for s in SHAPES}
        self.link_id = self._single_id(tokenizer, COLOR_LINK)
        by_name = {s: i for i, s in self.shape_ids.items()}
        # For each (true shape, next colour): the shape ids that may replace it.
        self.replacements = {
            (shape, color): [by_name[s] for s in SHAPES if s != shape and (color, s) not in HELDOUT_PAIRS]
            for color in COLORS
            for shape in SHAPES
        }

    @staticmethod
    def _single_id(tokenizer: Any, word: str) -> int:
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"ShapeWordSwap needs {word!r} to be one token after a space, but the tokenizer splits it "
                f"into {len(ids)}; train the tokenizer on the shapes captions (as the recipes do)."
            )
        return ids[0]

    def __call__(self, ids: list[int], labels: list[int]) -> list[int]:
        digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
        rng = random.Random(f"shape_swap/{self.seed}/{digest}")
        for t in range(len(ids) - 2):
            shape, color = self.shape_ids.get(ids[t]), self.color_ids.get(ids[t + 2])
            if shape is None or color is None or ids[t + 1] != self.link_id or labels[t] == -100:
                continue
            if rng.random() < self.probability:
                ids[t] = rng.choice(self.replacements[(shape, color)])
        return ids


class ShapesDataset(Dataset):
    """Shape scenes as {"image", "prompt", "answer"} examples for captioning, VQA or both.

    task="caption": one example per scene, prompt `caption_prompt`, answer the caption.
    task="vqa": one example per QA pair, prompt the question, answer the short answer.
    task="mixed": the caption examples followed by the VQA examples.
    """

    TASKS = ("caption", "vqa", "mixed")

    def __init__(
        self,
        split: str = "train",
        n: int = 1000,
        seed: int = 0,
        image_size: int = 64,
        task: str = "caption",
        caption_prompt: str = CAPTION_PROMPT,
    ) -> None:
        if task not in self.TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {self.TASKS}.")
        self.scenes = make_shapes_split(split, n, seed, image_size)
        self.examples: list[tuple[int, str, str]] = []
        if task in ("caption", "mixed"):
            self.examples += [(i, caption_prompt, s["caption"]) for i, s in enumerate(self.scenes)]
        if task in ("vqa", "mixed"):
            self.examples += [(i, q, a) for i, s in enumerate(self.scenes) for q, a in s["qa"]]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene_index, prompt, answer = self.examples[index]
        return {"image": self.scenes[scene_index]["image"], "prompt": prompt, "answer": answer}

"""Tests of the shape-scene generator and the easy-VQA loader."""

import re
import sys
import time
from collections import Counter

import pytest
from PIL import Image, ImageDraw

from vlm_mamba_hf.data.easy_vqa import (
    EasyVQADataset,
    easy_vqa_answers,
    easy_vqa_object,
    shapes_heldout_pairs,
)
from vlm_mamba_hf.data.shapes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    NUMBER_WORDS,
    OTHER_SHAPES,
    POSITIONS,
    SHAPES,
    SPLITS,
    ShapesDataset,
    _draw_shape,
    colour_description_for,
    make_any_colour_scenes,
    make_any_shape_scenes,
    make_shapes_split,
    nearest_color_name,
)

_POSITION_TO_CELL = {name: cell for cell, name in POSITIONS.items()}
_OBJECT_PHRASE = re.compile(
    r"an? (?P<shape>\w+) in (?P<color>\w+) (?:on|in|at) the (?P<position>top left|top right|bottom left|"
    r"bottom right|top|bottom|left|right|center)"
)


def _scene_key(scene):
    return scene["caption"], scene["qa"], scene["objects"], scene["image"].tobytes()


def test_same_seed_gives_identical_scenes():
    first = make_shapes_split("train", 50, seed=3)
    second = make_shapes_split("train", 50, seed=3)
    assert [_scene_key(s) for s in first] == [_scene_key(s) for s in second]


def test_different_seed_or_split_gives_different_scenes():
    base = [s["caption"] for s in make_shapes_split("train", 50, seed=0)]
    assert base != [s["caption"] for s in make_shapes_split("train", 50, seed=1)]
    assert base != [s["caption"] for s in make_shapes_split("test", 50, seed=0)]


def test_first_scenes_do_not_depend_on_n():
    short = make_shapes_split("val", 10, seed=7)
    long = make_shapes_split("val", 100, seed=7)
    assert [_scene_key(s) for s in short] == [_scene_key(s) for s in long[:10]]


def test_scene_content_does_not_depend_on_image_size():
    small = make_shapes_split("train", 30, seed=0, image_size=32)
    large = make_shapes_split("train", 30, seed=0, image_size=224)
    assert [s["caption"] for s in small] == [s["caption"] for s in large]
    assert large[0]["image"].size == (224, 224)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_heldout_pairs_never_drawn_or_named_outside_heldout(split):
    scenes = make_shapes_split(split, 2000, seed=0)
    # Questions name a pair colour first ("is there a red square?"), captions shape first ("square in red").
    named = [f"{c} {s}" for c, s in HELDOUT_PAIRS] + [f"{s} in {c}" for c, s in HELDOUT_PAIRS]
    for scene in scenes:
        assert not {(o["color"], o["shape"]) for o in scene["objects"]} & HELDOUT_PAIRS
        texts = [scene["caption"]] + [f"{q} {a}" for q, a in scene["qa"]]
        assert not [t for t in texts for pair in named if pair in t]


def test_every_heldout_scene_draws_a_heldout_pair():
    for scene in make_shapes_split("heldout", 500, seed=0):
        assert {(o["color"], o["shape"]) for o in scene["objects"]} & HELDOUT_PAIRS


def test_train_shows_every_colour_and_shape_of_the_heldout_pairs():
    pairs = {(o["color"], o["shape"]) for s in make_shapes_split("train", 1000, seed=0) for o in s["objects"]}
    assert {c for c, _ in pairs} == set(COLORS)
    assert {s for _, s in pairs} == set(SHAPES)
    assert len(pairs) == len(COLORS) * len(SHAPES) - len(HELDOUT_PAIRS)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_pixel_at_each_object_centre_has_its_named_colour(split, image_size):
    for scene in make_shapes_split(split, 100, seed=1, image_size=image_size):
        for obj in scene["objects"]:
            assert scene["image"].getpixel(obj["center"]) == COLORS[obj["color"]]


@pytest.mark.parametrize("split", SPLITS)
def test_caption_names_drawn_objects_in_reading_order(split):
    for scene in make_shapes_split(split, 300, seed=2):
        size = scene["image"].width
        drawn = []
        for obj in scene["objects"]:
            x, y = obj["center"]
            cell = (y * 3 // size, x * 3 // size)
            drawn.append((cell, obj["color"], obj["shape"]))
        described = [
            (_POSITION_TO_CELL[m["position"]], m["color"], m["shape"])
            for m in _OBJECT_PHRASE.finditer(scene["caption"])
        ]
        assert described == sorted(drawn), scene["caption"]
        assert len({cell for cell, _, _ in drawn}) == len(drawn)
        assert scene["caption"].endswith(".")


def test_colour_description_names_each_objects_colour_and_position_in_reading_order():
    for scene in make_shapes_split("train", 200, seed=3):
        text = colour_description_for(scene["objects"])
        described = re.findall(r"(\w+) (?:on|in|at) the ([a-z ]+?)(?=[.,]| and)", text)
        objects = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
        assert described == [(o["color"], o["position"]) for o in objects], text
        assert not [s for s in SHAPES if s in text] and text.endswith(".")


def _answer_from_objects(question, objects):
    shape_counts = Counter(o["shape"] for o in objects)
    by_position = {o["position"]: o for o in objects}
    if question == "how many shapes are there?":
        return NUMBER_WORDS[len(objects)]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return NUMBER_WORDS[shape_counts[m[1]]]
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        assert shape_counts[m[1]] == 1, "asked the colour of a shape that is not unique"
        return next(o["color"] for o in objects if o["shape"] == m[1])
    if m := re.fullmatch(r"what (shape|color) is (?:the shape )?(?:on|in|at) the ([\w ]+)\?", question):
        return by_position[m[2]][m[1]]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if (m[1], m[2]) in {(o["color"], o["shape"]) for o in objects} else "no"
    raise AssertionError(f"unrecognised question {question!r}")


@pytest.mark.parametrize("split", SPLITS)
def test_qa_answers_agree_with_objects(split):
    answers = Counter()
    for scene in make_shapes_split(split, 300, seed=4):
        for question, answer in scene["qa"]:
            assert answer == _answer_from_objects(question, scene["objects"]), question
            answers[answer] += 1
    assert answers["yes"] == answers["no"]


def test_nearest_color_name_names_each_palette_colour_and_its_neighbours():
    for name, rgb in COLORS.items():
        assert nearest_color_name(rgb) == name
        assert nearest_color_name(tuple(min(255, v + 12) for v in rgb)) == name
    assert nearest_color_name((255, 0, 0)) == "red"


def test_any_colour_scenes_are_deterministic_and_do_not_depend_on_n():
    first = make_any_colour_scenes(40, seed=2)
    again = make_any_colour_scenes(40, seed=2)
    longer = make_any_colour_scenes(80, seed=2)
    key = lambda s: (s["qa"], s["objects"], s["image"].tobytes())  # noqa: E731
    assert [key(s) for s in first] == [key(s) for s in again] == [key(s) for s in longer[:40]]
    assert [key(s) for s in first] != [key(s) for s in make_any_colour_scenes(40, seed=3)]


def test_any_colour_scenes_never_draw_a_heldout_pair_and_stay_visible():
    heldout_colours = {shape: {c for c, s in HELDOUT_PAIRS if s == shape} for shape in SHAPES}
    drawn = Counter()
    for scene in make_any_colour_scenes(2000, seed=0):
        background = BACKGROUNDS[scene["background"]]
        for obj in scene["objects"]:
            # The colour a viewer (or the palette) would name never pairs the shape into the held-out split.
            assert nearest_color_name(obj["rgb"]) not in heldout_colours[obj["shape"]], obj
            assert sum((a - b) ** 2 for a, b in zip(obj["rgb"], background)) >= 80**2
            assert scene["image"].getpixel(obj["center"]) == obj["rgb"]
            drawn[obj["shape"], nearest_color_name(obj["rgb"])] += 1
    # Every shape is drawn in colours near every palette colour it may have: the colours really vary.
    assert set(drawn) == {(s, c) for c in COLORS for s in SHAPES if c not in heldout_colours[s]}


def test_any_colour_scenes_have_colour_free_questions_and_description_matching_the_objects():
    for scene in make_any_colour_scenes(300, seed=1):
        positions = [o["position"] for o in scene["objects"]]
        assert positions == [
            o["position"] for o in sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
        ]
        for question, answer in scene["qa"]:
            assert not [c for c in COLORS if c in question or c in answer]
            assert answer == _answer_from_objects(question, scene["objects"]), question
        asked = {q for q, _ in scene["qa"] if q.startswith("what shape")}
        assert len(asked) == len(scene["objects"])
        # The description names the drawn shapes in reading order, without colours.
        size = scene["image"].width
        drawn = sorted(
            ((o["center"][1] * 3 // size, o["center"][0] * 3 // size), o["shape"]) for o in scene["objects"]
        )
        described = re.findall(
            r"a (circle|square|triangle) (?:on|in|at) the ([a-z ]+?)(?=[.,]| and)", scene["caption"]
        )
        assert [(_POSITION_TO_CELL[p], shape) for shape, p in described] == drawn, scene["caption"]


def test_any_shape_scenes_are_deterministic_and_do_not_depend_on_n():
    first = make_any_shape_scenes(40, seed=2)
    again = make_any_shape_scenes(40, seed=2)
    longer = make_any_shape_scenes(80, seed=2)
    assert [_scene_key(s) for s in first] == [_scene_key(s) for s in again]
    assert [_scene_key(s) for s in first] == [_scene_key(s) for s in longer[:40]]
    assert [_scene_key(s) for s in first] != [_scene_key(s) for s in make_any_shape_scenes(40, seed=3)]


def _object_mask(shape, center, size, image_size):
    """The pixel indices that `shape` covers when drawn at an object's centre and size."""
    image = Image.new("L", (image_size, image_size), 0)
    _draw_shape(ImageDraw.Draw(image), shape, *center, size // 2, 255)
    return {i for i, value in enumerate(image.tobytes()) if value}


def test_any_shape_scenes_draw_every_colour_on_shapes_unlike_the_named_ones():
    drawn = Counter()
    for scene in make_any_shape_scenes(300, seed=0):
        for obj in scene["objects"]:
            assert obj["shape"] in OTHER_SHAPES, obj
            assert scene["image"].getpixel(obj["center"]) == COLORS[obj["color"]]
            drawn[obj["shape"], obj["color"]] += 1
    assert set(drawn) == {(s, c) for s in OTHER_SHAPES for c in COLORS}
    # No object looks like a circle, square or triangle of its box: its pixels overlap each of theirs with an
    # intersection over union well below that of two named shapes (circle and square: 0.8), at the recipes'
    # 64 px and larger (below about 10 px an object is a blob whatever its shape).
    for size in (64, 128):
        for obj in (o for s in make_any_shape_scenes(40, seed=1, image_size=size) for o in s["objects"]):
            mask = _object_mask(obj["shape"], obj["center"], obj["size"], size)
            for shape in SHAPES:
                named = _object_mask(shape, obj["center"], obj["size"], size)
                assert len(mask & named) / len(mask | named) < 0.7, (obj, shape)


def test_any_shape_scenes_have_shape_free_questions_and_colour_description_matching_the_objects():
    for scene in make_any_shape_scenes(300, seed=4):
        words = set(
            re.findall(r"[a-z]+", " ".join([scene["caption"], *(f"{q} {a}" for q, a in scene["qa"])]))
        )
        assert not words & {name + plural for name in SHAPES + OTHER_SHAPES for plural in ("", "s")}
        assert scene["caption"] == colour_description_for(scene["objects"])
        size = scene["image"].width
        drawn = sorted(
            ((o["center"][1] * 3 // size, o["center"][0] * 3 // size), o["color"]) for o in scene["objects"]
        )
        described = re.findall(r"(\w+) (?:on|in|at) the ([a-z ]+?)(?=[.,]| and)", scene["caption"])
        assert sorted((_POSITION_TO_CELL[p], colour) for colour, p in described) == drawn, scene["caption"]
        asked = {q for q, _ in scene["qa"] if q.startswith("what color")}
        assert len(asked) == len(scene["objects"])
        for question, answer in scene["qa"]:
            assert answer == _answer_from_objects(question, scene["objects"]), question


def test_thousand_scenes_generate_in_a_couple_of_seconds():
    start = time.perf_counter()
    make_shapes_split("train", 1000, seed=0)
    # About 0.2 s on one core; the bound leaves room for a loaded machine.
    assert time.perf_counter() - start < 3.0


def test_dataset_caption_task_gives_one_example_per_scene():
    dataset = ShapesDataset("train", n=20, seed=0, task="caption")
    assert len(dataset) == 20
    example = dataset[5]
    assert set(example) == {"image", "prompt", "answer"}
    assert example["prompt"] == "Describe the image."
    assert example["answer"] == dataset.scenes[5]["caption"]
    assert isinstance(example["image"], Image.Image)


def test_dataset_vqa_task_gives_one_example_per_question():
    dataset = ShapesDataset("test", n=20, seed=0, task="vqa")
    flat = [(q, a) for s in dataset.scenes for q, a in s["qa"]]
    assert len(dataset) == len(flat)
    assert [(dataset[i]["prompt"], dataset[i]["answer"]) for i in range(len(dataset))] == flat


def test_dataset_mixed_task_concatenates_caption_and_vqa():
    mixed = ShapesDataset("train", n=10, seed=0, task="mixed", caption_prompt="")
    vqa = ShapesDataset("train", n=10, seed=0, task="vqa")
    assert len(mixed) == 10 + len(vqa)
    assert mixed[0]["prompt"] == ""


def test_unknown_split_or_task_is_rejected():
    with pytest.raises(ValueError, match="Unknown split"):
        make_shapes_split("training", 1, seed=0)
    with pytest.raises(ValueError, match="Unknown task"):
        ShapesDataset(task="detection")


def test_easy_vqa_counts_match_the_package():
    easy_vqa = pytest.importorskip("easy_vqa")
    for split, num_questions, paths in [
        ("train", 38575, easy_vqa.get_train_image_paths()),
        ("test", 9673, easy_vqa.get_test_image_paths()),
    ]:
        dataset = EasyVQADataset(split)
        assert dataset.skipped == 0
        assert len(dataset) == num_questions
        assert dataset.num_images == len(paths) == {"train": 4000, "test": 1000}[split]
        assert {e["answer"] for e in dataset.examples} == set(easy_vqa_answers())


def test_easy_vqa_has_thirteen_answers():
    pytest.importorskip("easy_vqa")
    assert len(set(easy_vqa_answers())) == 13


def test_easy_vqa_example_has_rgb_image_question_and_answer():
    pytest.importorskip("easy_vqa")
    example = EasyVQADataset("test", limit=5, seed=0)[0]
    assert example["image"].mode == "RGB" and example["image"].size == (64, 64)
    assert example["question"].endswith("?")
    assert example["answer"] in easy_vqa_answers()


def test_easy_vqa_limit_subsamples_deterministically():
    pytest.importorskip("easy_vqa")
    first = EasyVQADataset("train", limit=200, seed=1)
    again = EasyVQADataset("train", limit=200, seed=1)
    other = EasyVQADataset("train", limit=200, seed=2)
    questions = [(e["image_id"], e["question"]) for e in first.examples]
    assert len(first) == 200
    assert questions == [(e["image_id"], e["question"]) for e in again.examples]
    assert questions != [(e["image_id"], e["question"]) for e in other.examples]


EASY_VQA_SHAPE_QUESTIONS = (
    "what shape is in the image?",
    "what shape does the image contain?",
    "what shape is present?",
    "what is the shape?",
)


def test_easy_vqa_object_reads_the_colour_and_shape_that_the_answers_name():
    pytest.importorskip("easy_vqa")
    dataset = EasyVQADataset("test")
    objects = {}
    colours = shapes = 0
    for example in dataset.examples:
        image_id = example["image_id"]
        if image_id not in objects:
            objects[image_id] = easy_vqa_object(example["image"])
        colour, possible = objects[image_id]
        if example["question"] == "what color is the shape?":
            assert colour == example["answer"], image_id
            colours += 1
        if example["question"] in EASY_VQA_SHAPE_QUESTIONS:
            assert example["answer"] in possible, image_id
            shapes += 1
    assert colours > 300 and shapes > 900
    # Only a few images are ambiguous between circle and triangle.
    assert sum(len(possible) > 1 for _, possible in objects.values()) < 0.02 * len(objects)


def test_shapes_heldout_pairs_in_easy_vqa_names():
    assert shapes_heldout_pairs() == {("red", "rectangle"), ("green", "triangle"), ("blue", "circle")}


def test_exclude_pairs_drops_the_images_of_those_pairs_with_their_questions():
    pytest.importorskip("easy_vqa")
    full = EasyVQADataset("test")
    kept = EasyVQADataset("test", exclude_pairs=shapes_heldout_pairs())
    assert kept.excluded_images > 50 and kept.skipped == kept.skipped_questions == 0
    assert len(kept) + kept.excluded_questions == len(full)
    kept_ids = {e["image_id"] for e in kept.examples}
    assert len({e["image_id"] for e in full.examples} - kept_ids) == kept.excluded_images
    # No kept question or answer names a held-out pair of its image ("what color is the circle?" -> "blue").
    pairs = shapes_heldout_pairs()
    for example in kept.examples:
        words = set(re.findall(r"[a-z]+", example["question"])) | {example["answer"]}
        assert not any({colour, shape} <= words for colour, shape in pairs), example
    # And those questions are among the ones dropped.
    dropped = [e for e in full.examples if e["image_id"] not in kept_ids]
    assert any(e["question"] == "what color is the circle?" and e["answer"] == "blue" for e in dropped)
    with pytest.raises(ValueError, match="not easy-VQA"):
        EasyVQADataset("test", limit=5, exclude_pairs=[("red", "square")])


class _FakeEasyVQA:
    """Stands in for the easy_vqa package: three images, one of them not a PNG, one id without a file."""

    def __init__(self, directory):
        self.paths = {}
        for image_id in (0, 1):
            path = directory / f"{image_id}.png"
            Image.new("RGB", (64, 64), (255, 0, 0)).save(path)
            self.paths[image_id] = str(path)
        broken = directory / "2.png"
        broken.write_bytes(b"not a png")
        self.paths[2] = str(broken)

    def get_train_questions(self):
        texts = ["what color is the shape?", "is there a circle?", "what shape is it?", "is it red?", "q5?"]
        return texts, ["red", "no", "circle", "yes", "no"], [0, 1, 2, 2, 3]

    def get_train_image_paths(self):
        return dict(self.paths)

    def get_answers(self):
        return ["red", "yes", "no", "circle"]


def test_easy_vqa_skips_and_counts_unreadable_images(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "easy_vqa", _FakeEasyVQA(tmp_path))
    with caplog.at_level("WARNING", logger="vlm_mamba_hf.data.easy_vqa"):
        dataset = EasyVQADataset("train")
    assert dataset.skipped == 2
    assert dataset.skipped_questions == 3
    assert [e["image_id"] for e in dataset.examples] == [0, 1]
    assert "skipped 2 image(s)" in caplog.text


def test_easy_vqa_without_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)
    with pytest.raises(ImportError, match=re.escape('pip install "vlm-mamba-hf[data]"')):
        EasyVQADataset("train")

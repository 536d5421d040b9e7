"""The `vlm-mamba` command and the built-in default model: help, caption, vqa, demo, and real answers."""

import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from vlm_mamba_hf.cli import ASSETS_DIR, main
from vlm_mamba_hf.training.evaluate import default_model_path, generate_answers

DEFAULT_MODEL = default_model_path()
needs_default_model = pytest.mark.skipif(
    not (Path(DEFAULT_MODEL) / "model.safetensors").is_file(),
    reason="the built-in default model is not trained yet",
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "vlm_mamba_hf.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def default_model():
    model = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL)
    return model.eval(), AutoProcessor.from_pretrained(DEFAULT_MODEL)


def test_help_lists_every_command():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("caption", "vqa", "demo", "train", "eval"):
        assert command in result.stdout


def test_subcommand_help_names_the_options(capsys):
    for command in ("caption", "vqa", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--model" in out and "--device" in out and "--dtype" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--recipe" in capsys.readouterr().out


def test_missing_model_folder_is_a_clear_error(tmp_path):
    result = _cli("caption", str(ASSETS_DIR / "shapes_test_0.png"), "--model", str(tmp_path / "nowhere"))
    assert result.returncode != 0
    assert "no checkpoint folder" in result.stderr


@needs_default_model
def test_caption_vqa_and_demo_run_on_the_default_model():
    image = str(ASSETS_DIR / "easy_vqa_test_0.png")
    caption = _cli("caption", str(ASSETS_DIR / "shapes_test_0.png"), "--device", "cpu", "--dtype", "float32")
    assert caption.returncode == 0, caption.stderr
    assert caption.stdout.startswith(str(ASSETS_DIR / "shapes_test_0.png") + ": ")
    vqa = _cli("vqa", image, "what shape is in the image?", "what color is the shape?")
    assert vqa.returncode == 0, vqa.stderr
    assert vqa.stdout.count("Q: ") == 2 and vqa.stdout.count("A: ") == 2
    demo = _cli("demo")
    assert demo.returncode == 0, demo.stderr
    assert "answers match the references" in demo.stdout


@needs_default_model
def test_default_model_answers_easy_vqa_test_questions(default_model):
    """It sees: colour questions (chance and the text-only prior: about 12%) are answered from the image."""
    from vlm_mamba_hf.data import EasyVQADataset
    from vlm_mamba_hf.metrics import vqa_accuracy

    model, processor = default_model
    examples = EasyVQADataset("test", limit=400, seed=1).examples
    color = [e for e in examples if "color" in e["question"]][:48]
    answers = generate_answers(model, processor, [e["image"] for e in color], [e["question"] for e in color])
    assert vqa_accuracy(answers, [e["answer"] for e in color]) >= 0.8
    mixed = examples[:96]
    answers = generate_answers(model, processor, [e["image"] for e in mixed], [e["question"] for e in mixed])
    assert vqa_accuracy(answers, [e["answer"] for e in mixed]) >= 0.75


@needs_default_model
def test_default_model_loads_in_the_image_text_to_text_pipeline(default_model):
    pipe = pipeline("image-text-to-text", model=DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": str(ASSETS_DIR / "shapes_test_0.png")},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    out = pipe(text=messages, max_new_tokens=48, return_full_text=False)
    model, processor = default_model
    image = PIL.Image.open(ASSETS_DIR / "shapes_test_0.png").convert("RGB")
    direct = generate_answers(model, processor, [image], ["Describe the image."], max_new_tokens=48)[0]
    assert out[0]["generated_text"].strip() == direct


@needs_default_model
def test_image_contrast_reaches_generate_from_the_cli_and_the_pipeline(default_model, capsys, tmp_path):
    """`--image-contrast` (CLI), `image_contrast` (pipeline generate kwargs) and `generate_answers` decode the
    same caption, and it is not the greedy one where the two differ. The default model captions shape scenes,
    held-out ones included, the same either way, so the images are easy-VQA's: never captioned in training,
    they leave it unsure enough for the contrast to change some captions."""
    from vlm_mamba_hf.data.easy_vqa import EasyVQADataset
    from vlm_mamba_hf.data.shapes import CAPTION_PROMPT

    model, processor = default_model
    dataset = EasyVQADataset("test", limit=60, seed=0)
    images = list({dataset[i]["image_id"]: dataset[i]["image"] for i in range(len(dataset))}.values())[:12]
    greedy = generate_answers(model, processor, images, [CAPTION_PROMPT] * 12, max_new_tokens=48)
    contrast = generate_answers(
        model, processor, images, [CAPTION_PROMPT] * 12, max_new_tokens=48, image_contrast=1.0
    )
    differing = [i for i in range(12) if greedy[i] != contrast[i]]
    assert differing, "image contrast changed none of 12 easy-VQA captions"
    i = differing[0]
    path = tmp_path / "easy_vqa.png"
    images[i].save(path)
    assert main(["caption", str(path), "--image-contrast", "1.0", "--device", "cpu"]) in (0, None)
    assert capsys.readouterr().out.strip() == f"{path}: {contrast[i]}"
    assert main(["caption", str(path), "--image-contrast", "0", "--device", "cpu"]) in (0, None)
    assert capsys.readouterr().out.strip() == f"{path}: {greedy[i]}"
    pipe = pipeline("image-text-to-text", model=DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    content = [{"type": "image", "image": images[i]}, {"type": "text", "text": CAPTION_PROMPT}]
    out = pipe(
        text=[{"role": "user", "content": content}],
        max_new_tokens=48,
        return_full_text=False,
        generate_kwargs={"image_contrast": 1.0},
    )
    assert out[0]["generated_text"].strip() == contrast[i]


def test_demo_samples_are_the_generators_scenes_with_their_references():
    """The bundled shape samples are scenes of `make_shapes_split` (seed 0, 64 px): the same pixels, and the
    demo's references are those scenes' caption and answers, so they follow any change of the templates."""
    import json

    from vlm_mamba_hf.data.shapes import make_shapes_split

    samples = json.loads((ASSETS_DIR / "samples.json").read_text())
    shape_samples = [s for s in samples if s["file"].startswith("shapes_")]
    assert len(shape_samples) >= 2
    for sample in shape_samples:
        split, index = sample["file"].removesuffix(".png").split("_")[1:]
        scene = make_shapes_split(split, int(index) + 1, seed=0, image_size=64)[int(index)]
        image = PIL.Image.open(ASSETS_DIR / sample["file"]).convert("RGB")
        assert image.tobytes() == scene["image"].tobytes(), sample["file"]
        assert sample["caption"] == scene["caption"]
        answers = dict(scene["qa"])
        assert all(answers[qa["question"]] == qa["answer"] for qa in sample["questions"])

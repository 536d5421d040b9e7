"""Exported remote code loads and runs in a fresh process where vlm_mamba_hf cannot be imported."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_vlm import WORDS, random_image, tiny_vlm_config

from vlm_mamba_hf import VLMambaForConditionalGeneration, VLMambaImageProcessor, VLMambaProcessor
from vlm_mamba_hf.remote_code import CODE_FILES, export_remote_code
from vlm_mamba_hf.tokenizer_utils import build_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = build_tokenizer([WORDS] * 20, vocab_size=300)
    model = VLMambaForConditionalGeneration(tiny_vlm_config(tokenizer)).eval()
    processor = VLMambaProcessor(
        VLMambaImageProcessor(size={"height": 32, "width": 32}), tokenizer, image_seq_length=16
    )
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def test_export_writes_code_and_auto_map_and_leaves_source_untouched(checkpoint, tmp_path):
    src, _, _ = checkpoint
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = export_remote_code(src, tmp_path / "remote")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    for name in CODE_FILES:
        assert (out / name).is_file()
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_vlm_mamba.VLMambaForConditionalGeneration"
    with pytest.raises(FileExistsError):
        export_remote_code(src, out)


def test_remote_code_runs_without_the_package(checkpoint, tmp_path):
    src, model, processor = checkpoint
    out = export_remote_code(src, tmp_path / "remote")
    image = random_image(3)
    image.save(tmp_path / "image.png")
    inputs = processor(images=[image], text=["<image> what color"], return_tensors="pt")
    expected_ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected_text = processor.batch_decode(
        expected_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["vlm_mamba_hf"] = None  # importing the package now fails
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
        model = AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        image = Image.open({str(tmp_path / "image.png")!r})
        inputs = processor(images=[image], text=["<image> what color"], return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        pipe = pipeline("image-text-to-text", model={str(out)!r}, trust_remote_code=True)
        text = pipe(images=image, text="<image> what color", max_new_tokens=5, do_sample=False,
                    return_full_text=False)[0]["generated_text"]
        print(json.dumps({{"ids": ids.tolist(), "text": text}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["ids"] == expected_ids.tolist()
    assert got["text"] == expected_text[0]


def test_cli_export_remote_code(checkpoint, tmp_path):
    src, _, _ = checkpoint
    out = tmp_path / "cli_out"
    result = subprocess.run(
        [sys.executable, "-m", "vlm_mamba_hf.cli", "export-remote-code", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoConfig"].startswith(
        "configuration_"
    )
    again = subprocess.run(
        [sys.executable, "-m", "vlm_mamba_hf.cli", "export-remote-code", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and "not empty" in again.stderr

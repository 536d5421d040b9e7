"""Image processor, tokenizer helper and processor: conversions, token expansion, errors, save/load."""

import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoImageProcessor, PretrainedConfig
from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

from vlm_mamba_hf.image_processing_vlm_mamba import VLMambaImageProcessor
from vlm_mamba_hf.processing_vlm_mamba import VLMambaProcessor
from vlm_mamba_hf.tokenizer_utils import build_tokenizer

IMAGE_SEQ_LENGTH = 5
SIZE = {"height": 32, "width": 32}
CORPUS = [
    "What color is the shape?",
    "what color is the circle?",
    "Is there a red triangle in the image?",
    "Does the image contain a blue rectangle?",
    "USER: <image>\nWhat shape is it? ASSISTANT: circle",
    "yes no red green blue yellow gray teal brown black",
] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture
def processor(tokenizer):
    return VLMambaProcessor(VLMambaImageProcessor(size=SIZE), tokenizer, image_seq_length=IMAGE_SEQ_LENGTH)


def _random_rgb(height: int = 12, width: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _raw_rgb(image, **kwargs) -> np.ndarray:
    """The processor's RGB conversion alone: no resize (size = image size), no rescale, no normalize; HWC."""
    if isinstance(image, PIL.Image.Image):
        height, width = image.height, image.width
    else:
        height, width = kwargs.pop("hw")
    image_processor = VLMambaImageProcessor(
        size={"height": height, "width": width}, do_rescale=False, do_normalize=False
    )
    pixel_values = image_processor(image, return_tensors="np", **kwargs)["pixel_values"]
    assert pixel_values.shape == (1, 3, height, width)
    return pixel_values[0].transpose(1, 2, 0)


def _over_white(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    alpha = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(values.astype(np.float64) * alpha + 255.0 * (1.0 - alpha))


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG signature + IHDR + IEND: PIL reads the size from the header without any pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _ensure_image_processor_registered() -> None:
    """`ProcessorMixin.from_pretrained` loads the image processor through `AutoImageProcessor`."""
    if get_image_processor_class_from_name("VLMambaImageProcessor") is VLMambaImageProcessor:
        return
    try:
        from vlm_mamba_hf.configuration_vlm_mamba import VLMambaConfig as config_class
    except ImportError:

        class config_class(PretrainedConfig):
            model_type = "vlm_mamba_processing_test"

    AutoImageProcessor.register(
        config_class, image_processor_classes={"pil": VLMambaImageProcessor}, exist_ok=True
    )


# ---------------------------------------------------------------- RGB conversion


def test_rgb_image_is_unchanged():
    rgb = _random_rgb()
    np.testing.assert_array_equal(_raw_rgb(PIL.Image.fromarray(rgb)), rgb)


def test_grayscale_l_is_replicated_to_three_channels():
    gray = _random_rgb()[..., 0]
    np.testing.assert_array_equal(_raw_rgb(PIL.Image.fromarray(gray)), np.repeat(gray[..., None], 3, -1))


def test_la_alpha_is_composited_on_white():
    rng = np.random.default_rng(1)
    gray, alpha = rng.integers(0, 256, (2, 9, 7), dtype=np.uint8)
    image = PIL.Image.fromarray(np.stack([gray, alpha], -1))
    assert image.mode == "LA"
    expected = np.repeat(_over_white(gray[..., None], alpha), 3, -1)
    np.testing.assert_array_equal(_raw_rgb(image), expected)


def test_rgba_alpha_is_composited_on_white():
    rgb = _random_rgb()
    alpha = np.random.default_rng(2).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255  # fully transparent -> white; opaque -> unchanged
    image = PIL.Image.fromarray(np.dstack([rgb, alpha]))
    assert image.mode == "RGBA"
    converted = _raw_rgb(image)
    np.testing.assert_array_equal(converted, _over_white(rgb, alpha))
    np.testing.assert_array_equal(converted[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(converted[0, 1], rgb[0, 1])


def _palette_image(indices: np.ndarray, palette: np.ndarray) -> PIL.Image.Image:
    image = PIL.Image.new("P", (indices.shape[1], indices.shape[0]))
    image.putpalette(palette.flatten().tolist())
    image.putdata(indices.flatten().tolist())
    return image


def test_palette_p_maps_through_the_palette():
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    np.testing.assert_array_equal(_raw_rgb(_palette_image(indices, palette)), palette[indices])


def test_palette_transparent_index_becomes_white():
    rng = np.random.default_rng(4)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 4, (6, 8), dtype=np.uint8)
    image = _palette_image(indices, palette)
    image.info["transparency"] = 2
    expected = palette[indices].copy()
    expected[indices == 2] = 255
    np.testing.assert_array_equal(_raw_rgb(image), expected)


def test_cmyk_uses_the_subtractive_formula():
    cmyk = np.random.default_rng(5).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    image = PIL.Image.frombytes("CMYK", (6, 5), cmyk.tobytes())
    cmy, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = np.round((255.0 - cmy) * (255.0 - k) / 255.0)
    np.testing.assert_allclose(_raw_rgb(image), expected, atol=1)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32], ids=["I;16", "I"])
def test_sixteen_bit_images_are_scaled_to_eight_bits(dtype):
    values = np.random.default_rng(6).integers(0, 65536, (6, 7)).astype(dtype)
    values[0, 0], values[0, 1] = 0, 65535
    image = PIL.Image.fromarray(values)
    assert image.mode == ("I;16" if dtype == np.uint16 else "I")
    converted = _raw_rgb(image)
    expected = np.repeat(np.round(values.astype(np.float64) * 255.0 / 65535.0)[..., None], 3, -1)
    np.testing.assert_array_equal(converted, expected)
    assert converted[0, 0, 0] == 0 and converted[0, 1, 0] == 255


def test_sixteen_bit_png_file_is_scaled_to_eight_bits(tmp_path):
    values = np.random.default_rng(7).integers(0, 65536, (6, 7)).astype(np.uint16)
    path = tmp_path / "sixteen.png"
    PIL.Image.fromarray(values).save(path)
    expected = np.repeat(np.round(values.astype(np.float64) * 255.0 / 65535.0)[..., None], 3, -1)
    np.testing.assert_array_equal(_raw_rgb(str(path), hw=(6, 7)), expected)


@pytest.mark.parametrize("scale", [1.0, 255.0], ids=["unit-range", "byte-range"])
def test_float_f_images_are_scaled_to_eight_bits(scale):
    values = np.random.default_rng(8).random((6, 7)).astype(np.float32) * scale
    image = PIL.Image.fromarray(values)
    assert image.mode == "F"
    expected = np.round(values.astype(np.float64) * (255.0 / scale if scale == 1.0 else 1.0))
    np.testing.assert_array_equal(_raw_rgb(image), np.repeat(expected[..., None], 3, -1))


def test_one_bit_image_becomes_black_and_white():
    bits = np.random.default_rng(9).random((6, 8)) > 0.5
    image = PIL.Image.fromarray(bits)
    assert image.mode == "1"
    np.testing.assert_array_equal(_raw_rgb(image), np.repeat(bits[..., None] * 255, 3, -1))


def test_array_layouts_and_types_give_the_same_pixels(tmp_path):
    rgb = _random_rgb(12, 10)
    path = tmp_path / "image.png"
    PIL.Image.fromarray(rgb).save(path)
    image_processor = VLMambaImageProcessor(size=SIZE)
    reference = image_processor(PIL.Image.fromarray(rgb), return_tensors="pt")["pixel_values"]
    for same_image in [
        rgb,
        rgb.transpose(2, 0, 1),
        rgb.astype(np.float32) / 255.0,
        torch.from_numpy(rgb.transpose(2, 0, 1).copy()),
        str(path),
        path,
    ]:
        torch.testing.assert_close(
            image_processor(same_image, return_tensors="pt")["pixel_values"], reference
        )


def test_grayscale_2d_array_and_uint16_array():
    gray = _random_rgb()[..., 0]
    np.testing.assert_array_equal(_raw_rgb(gray, hw=gray.shape), np.repeat(gray[..., None], 3, -1))
    sixteen = gray.astype(np.uint16) * 257  # exact 16-bit version of the same image
    np.testing.assert_array_equal(_raw_rgb(sixteen, hw=gray.shape), np.repeat(gray[..., None], 3, -1))


# ---------------------------------------------------------------- resize, rescale, normalize


def test_resize_rescale_normalize_match_a_manual_computation():
    rgb = _random_rgb(37, 53)  # not a multiple of any patch size
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    image_processor = VLMambaImageProcessor(size={"height": 24, "width": 40}, image_mean=mean, image_std=std)
    pixel_values = image_processor(PIL.Image.fromarray(rgb), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 24, 40) and pixel_values.dtype == torch.float32

    resized = np.asarray(PIL.Image.fromarray(rgb).resize((40, 24), PIL.Image.Resampling.BICUBIC), np.float64)
    expected = (resized / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(pixel_values[0].numpy().transpose(1, 2, 0), expected, atol=1e-5)


def test_constant_image_normalizes_to_the_exact_value():
    image = PIL.Image.new("RGB", (7, 5), (0, 255, 51))
    pixel_values = VLMambaImageProcessor(size=SIZE)(image, return_tensors="pt")["pixel_values"][0]
    expected = (torch.tensor([0.0, 1.0, 0.2]) - 0.5) / 0.5
    torch.testing.assert_close(pixel_values.mean(dim=(1, 2)), expected)
    torch.testing.assert_close(pixel_values.amax(dim=(1, 2)), pixel_values.amin(dim=(1, 2)))


def test_default_size_and_flat_nested_and_batched_inputs():
    image = PIL.Image.fromarray(_random_rgb())
    image_processor = VLMambaImageProcessor()
    assert image_processor.size == {"height": 224, "width": 224}
    assert image_processor.resample == PIL.Image.Resampling.BICUBIC
    assert image_processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)
    small = VLMambaImageProcessor(size=SIZE)
    assert small([image, image], return_tensors="pt")["pixel_values"].shape == (2, 3, 32, 32)
    assert small([[image, image], [image]], return_tensors="pt")["pixel_values"].shape == (3, 3, 32, 32)
    assert small(np.stack([_random_rgb()] * 4), return_tensors="pt")["pixel_values"].shape == (4, 3, 32, 32)


def test_image_processor_save_and_load_round_trip(tmp_path):
    image_processor = VLMambaImageProcessor(size={"height": 48, "width": 64}, image_mean=(0.1, 0.2, 0.3))
    image_processor.save_pretrained(tmp_path)
    loaded = VLMambaImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == image_processor.to_dict()
    _ensure_image_processor_registered()
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is VLMambaImageProcessor
    image = PIL.Image.fromarray(_random_rgb())
    torch.testing.assert_close(
        loaded(image, return_tensors="pt")["pixel_values"],
        image_processor(image, return_tensors="pt")["pixel_values"],
    )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("bad_image", "message"),
    [
        (None, "is None"),
        ([PIL.Image.new("RGB", (4, 4)), None], r"images\[1\] is None"),
        (np.zeros((1, 1, 3), np.uint8), "at least 2x2"),
        (PIL.Image.new("RGB", (1, 1)), "at least 2x2"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (PIL.Image.new("RGB", (0, 0)), "empty"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN or infinite"),
        (torch.full((3, 4, 4), float("inf")), "NaN or infinite"),
        (np.zeros((8, 8, 5), np.uint8), "channels"),
        (np.zeros((8, 8, 2), np.uint8), "channels"),
        (np.full((4, 4, 3), -0.5, np.float32), "already normalized"),
        (np.full((4, 4, 3), 300, np.int64), "outside"),
        (np.zeros((2, 3, 4, 4, 4), np.uint8), "shape"),
        ({"not": "an image"}, "Unsupported image type"),
    ],
    ids=[
        "none",
        "none-in-list",
        "1x1-array",
        "1x1-pil",
        "zero-size-array",
        "zero-size-pil",
        "nan",
        "inf",
        "five-channels",
        "two-channels",
        "negative-float",
        "int-above-255",
        "5d",
        "dict",
    ],
)
def test_bad_images_raise_a_clear_value_error(bad_image, message):
    with pytest.raises(ValueError, match=message):
        VLMambaImageProcessor(size=SIZE)(bad_image)


def test_file_that_is_not_an_image_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a PNG")
    with pytest.raises(ValueError, match="UnidentifiedImageError"):
        VLMambaImageProcessor(size=SIZE)(str(path))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        VLMambaImageProcessor(size=SIZE)(tmp_path / "missing.png")


def test_decompression_bomb_file_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_header_only_png(20000, 20000))  # 4e8 pixels, a few bytes on disk
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        VLMambaImageProcessor(size=SIZE)(str(path))


@pytest.mark.parametrize("side", [40, 64], ids=["above-limit", "above-twice-limit"])
def test_images_above_max_image_pixels_are_refused(tmp_path, monkeypatch, side):
    # 40x40 is between 1x and 2x the limit (PIL only warns), 64x64 above 2x (PIL raises): both are refused.
    path = tmp_path / "big.png"
    PIL.Image.fromarray(_random_rgb(side, side)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        VLMambaImageProcessor(size=SIZE)(path)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        VLMambaImageProcessor(size=SIZE)(PIL.Image.fromarray(_random_rgb(side, side)))


def test_do_convert_rgb_false_refuses_non_rgb_images():
    with pytest.raises(ValueError, match="do_convert_rgb"):
        VLMambaImageProcessor(size=SIZE, do_convert_rgb=False)(PIL.Image.new("L", (4, 4)))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_plain_text(tokenizer):
    for text in ["what color is the circle?", "What? Yes, it's 3 red-ish circles!  ok\nnew line"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_special_tokens(tokenizer):
    ids = {
        token: tokenizer.convert_tokens_to_ids(token)
        for token in ["<pad>", "<unk>", "<bos>", "<eos>", "<image>"]
    }
    assert ids == {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, "<image>": 4}
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 2, 3)
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == 4
    assert tokenizer.encode("<image><image>", add_special_tokens=False) == [4, 4]
    assert tokenizer.decode(tokenizer.encode("a <image> b"), skip_special_tokens=True) == "a  b"
    assert len(tokenizer) <= 320


# ---------------------------------------------------------------- processor


def _image(seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(_random_rgb(seed=seed))


def test_each_image_token_expands_to_image_seq_length_tokens(processor, tokenizer):
    outputs = processor(
        images=[_image(0), _image(1)], text="<image> left, <image> right", return_tensors="pt"
    )
    ids = outputs["input_ids"][0].tolist()
    image_id = processor.image_token_id
    assert ids.count(image_id) == 2 * IMAGE_SEQ_LENGTH
    assert ids[:IMAGE_SEQ_LENGTH] == [image_id] * IMAGE_SEQ_LENGTH
    second = ids.index(image_id, IMAGE_SEQ_LENGTH)
    assert ids[second : second + IMAGE_SEQ_LENGTH] == [image_id] * IMAGE_SEQ_LENGTH
    assert tokenizer.decode(ids, skip_special_tokens=True) == " left,  right"
    assert outputs["pixel_values"].shape == (2, 3, 32, 32)


def test_image_seq_length_can_be_overridden_per_call(processor):
    ids = processor(images=_image(), text="hi", image_seq_length=2)["input_ids"][0]
    assert ids.count(processor.image_token_id) == 2


def test_text_without_image_token_gets_it_prefixed(processor):
    implicit = processor(images=_image(), text="What color is the shape?", return_tensors="pt")
    explicit = processor(images=_image(), text="<image>What color is the shape?", return_tensors="pt")
    torch.testing.assert_close(implicit["input_ids"], explicit["input_ids"])
    assert (
        implicit["input_ids"][0, :IMAGE_SEQ_LENGTH].tolist() == [processor.image_token_id] * IMAGE_SEQ_LENGTH
    )


def test_nested_images_prefix_one_token_per_image_of_the_sample(processor):
    outputs = processor(images=[[_image(0), _image(1)], [_image(2)]], text=["compare them", "<image> one"])
    counts = [ids.count(processor.image_token_id) for ids in outputs["input_ids"]]
    assert counts == [2 * IMAGE_SEQ_LENGTH, IMAGE_SEQ_LENGTH]


def test_images_without_text_give_captioning_prompts(processor):
    outputs = processor(images=[_image(0), _image(1)], return_tensors="pt")
    assert outputs["input_ids"].tolist() == [[processor.image_token_id] * IMAGE_SEQ_LENGTH] * 2
    assert outputs["pixel_values"].shape == (2, 3, 32, 32)


def test_text_only_has_no_pixel_values(processor, tokenizer):
    outputs = processor(text="what color is the circle?")
    assert set(outputs) == {"input_ids", "attention_mask"}
    assert outputs["input_ids"][0] == tokenizer.encode("what color is the circle?")


def test_image_token_count_mismatch_names_both_counts(processor):
    with pytest.raises(
        ValueError, match=r"number of <image> tokens \(3\) does not match the number of images \(2\)"
    ):
        processor(images=[_image(0), _image(1)], text="<image><image><image> three")
    with pytest.raises(ValueError, match=r"\(1\) does not match the number of images \(2\)"):
        processor(images=[_image(0), _image(1)], text="only one prefixed")


def test_image_tokens_without_images_are_refused(processor):
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="<image> what is it?")


def test_empty_text_without_image_is_refused(processor):
    with pytest.raises(ValueError, match="empty"):
        processor(text="")
    with pytest.raises(ValueError, match="empty"):
        processor(images=[[_image()], []])  # the second sample has neither text nor image
    with pytest.raises(ValueError, match="neither"):
        processor()
    with pytest.raises(ValueError, match="list of strings"):
        processor(text=[1, 2])


def test_batches_are_left_padded(processor, tokenizer):
    texts = ["red", "What color is the shape in the image?"]
    outputs = processor(images=[_image(0), _image(1)], text=texts, return_tensors="pt")
    ids, mask = outputs["input_ids"], outputs["attention_mask"]
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0
    assert mask[0].tolist() == [0] * n_pad + [1] * (ids.shape[1] - n_pad)
    assert ids[0, :n_pad].tolist() == [tokenizer.pad_token_id] * n_pad
    assert mask[1].all()
    right = processor(images=[_image(0), _image(1)], text=texts, padding_side="right", return_tensors="pt")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0


def test_pipeline_style_kwargs_are_accepted(processor):
    outputs = processor(images=[_image()], text="red?", return_tensors="pt", padding=True, legacy=False)
    assert outputs["input_ids"].shape[0] == 1
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]


def test_truncating_image_tokens_is_refused(processor):
    with pytest.raises(ValueError, match="Mismatch"):
        processor(images=_image(), text="a long question about colors", truncation=True, max_length=3)


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]},
]


def test_chat_template_renders_an_image_question(processor):
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat color is the shape? ASSISTANT:"
    answered = [{"role": "system", "content": "Answer in one word."}, *CONVERSATION]
    answered.append({"role": "assistant", "content": [{"type": "text", "text": "red"}]})
    assert (
        processor.apply_chat_template(answered)
        == "SYSTEM: Answer in one word. USER: <image>\nWhat color is the shape? ASSISTANT: red<eos>"
    )


def test_chat_template_tokenizes_with_the_image(processor):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": _image()}, *CONVERSATION[0]["content"][1:]]}
    ]
    outputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert outputs["input_ids"][0].tolist().count(processor.image_token_id) == IMAGE_SEQ_LENGTH
    assert outputs["pixel_values"].shape == (1, 3, 32, 32)
    decoded = processor.post_process_image_text_to_text(outputs["input_ids"])
    assert decoded == ["USER: \nWhat color is the shape? ASSISTANT:"]


def test_chat_template_rejects_unknown_roles(processor):
    with pytest.raises(TemplateError, match="Unsupported role"):
        processor.apply_chat_template([{"role": "narrator", "content": "hello"}])


def test_post_process_image_text_to_text_skips_special_tokens(processor, tokenizer):
    image_id = processor.image_token_id
    answer = tokenizer.encode(" red", add_special_tokens=False)
    generated = torch.tensor(
        [[tokenizer.pad_token_id] + [image_id] * IMAGE_SEQ_LENGTH + answer + [tokenizer.eos_token_id]]
    )
    assert processor.post_process_image_text_to_text(generated) == [" red"]
    assert processor.post_process_image_text_to_text(generated[0]) == [" red"]
    kept = processor.post_process_image_text_to_text(generated, skip_special_tokens=False)[0]
    assert kept == "<pad>" + "<image>" * IMAGE_SEQ_LENGTH + " red<eos>"
    assert processor.batch_decode(generated, skip_special_tokens=True) == [" red"]
    assert processor.decode(generated[0], skip_special_tokens=True) == " red"


def test_processor_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    _ensure_image_processor_registered()
    loaded = VLMambaProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, VLMambaImageProcessor)
    assert loaded.image_seq_length == IMAGE_SEQ_LENGTH
    assert loaded.image_token == "<image>" and loaded.image_token_id == processor.image_token_id
    assert loaded.chat_template == processor.chat_template
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.image_processor.size == SIZE
    inputs = {"images": [_image(0), _image(1)], "text": ["red", "what color?"], "return_tensors": "pt"}
    expected, actual = processor(**inputs), loaded(**inputs)
    for key in ["input_ids", "attention_mask", "pixel_values"]:
        torch.testing.assert_close(actual[key], expected[key])


def test_processor_requires_a_tokenizer_with_the_image_token(tokenizer):
    with pytest.raises(ValueError, match="one token"):
        VLMambaProcessor(VLMambaImageProcessor(), tokenizer, image_token="<picture>")


def test_image_paths_are_accepted_by_the_processor(processor, tmp_path):
    path = Path(tmp_path) / "image.png"
    _image().save(path)
    from_path = processor(images=str(path), text="what?", return_tensors="pt")
    from_pil = processor(images=_image(), text="what?", return_tensors="pt")
    torch.testing.assert_close(from_path["pixel_values"], from_pil["pixel_values"])


def test_assistant_tokens_mask_covers_only_the_answer(processor, tokenizer):
    question = [{"type": "image", "image": _image()}, {"type": "text", "text": "What color is the shape?"}]
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": "red"}]
    outputs = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert outputs["input_ids"][0].count(processor.image_token_id) == IMAGE_SEQ_LENGTH
    ids, mask = outputs["input_ids"][0], outputs["assistant_masks"][0]
    answer = [token for token, keep in zip(ids, mask) if keep]
    assert tokenizer.decode(answer) == " red<eos>"
    assert answer[-1] == tokenizer.eos_token_id
    assert mask[-len(answer) :] == [1] * len(answer)

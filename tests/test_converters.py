"""Tests of the checkpoint converters in scripts/convert/, on tiny checkpoints written here in each source format."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_mamba2_config
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from vlm_mamba_hf import (
    VLMambaConfig,
    VLMambaForConditionalGeneration,
    VLMambaVisionConfig,
    VLMambaVisionModel,
)
from vlm_mamba_hf.modeling_vlm_mamba import VLMambaMixer
from vlm_mamba_hf.processing_vlm_mamba import VLMambaProcessor
from vlm_mamba_hf.tokenizer_utils import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.convert import _common  # noqa: E402
from scripts.convert import convert_mamba_lm_to_vlm_mamba as lm_conv  # noqa: E402
from scripts.convert import convert_seed_checkpoint as seed_conv  # noqa: E402
from scripts.convert import convert_vim_to_vlm_mamba as vim_conv  # noqa: E402

FP32_ATOL = 1e-4  # float32 logits: transformers' sequential scan vs VLMamba's scan
VOCAB = 300
SCRIPTS = ROOT / "scripts" / "convert"
CLI_SCRIPTS = (
    "convert_mamba_lm_to_vlm_mamba.py",
    "convert_vim_to_vlm_mamba.py",
    "convert_seed_checkpoint.py",
)
TEXTS = ["a red circle on the left", "the blue square is at the top", "what color is the shape?"] * 20


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight visible random values so that parity checks are not trivially satisfied."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("A_log", "A_b_log")):
                continue
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def _tiny_lm(vocab_size: int = VOCAB, seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, state_size=8)
    return _randomize(MambaForCausalLM(config), seed)


def _tiny_mamba2_config(vocab_size: int = VOCAB, **overrides) -> Mamba2Config:
    # chunk_size 5: the converter's 16-token check and _logits_diff's 12 tokens span several chunks and end
    # inside one.
    return tiny_mamba2_config(**{"vocab_size": vocab_size, "chunk_size": 5, **overrides})


def _tiny_mamba2_lm(vocab_size: int = VOCAB, seed: int = 0) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    return _randomize(Mamba2ForCausalLM(_tiny_mamba2_config(vocab_size)), seed)


def _tiny_vision_config(**overrides) -> VLMambaVisionConfig:
    kwargs = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, state_size=4)
    return VLMambaVisionConfig(**{**kwargs, **overrides})


def _logits_diff(source: MambaForCausalLM, converted_dir: Path, vocab: int, avoid: int) -> float:
    converted = VLMambaForConditionalGeneration.from_pretrained(
        str(converted_dir), dtype=torch.float32
    ).eval()
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[ids == avoid] = (avoid + 1) % vocab
    with torch.no_grad():
        expected = source.eval()(input_ids=ids, use_cache=False).logits[..., :vocab]
        actual = converted(input_ids=ids, use_cache=False).logits[..., :vocab]
    return (expected - actual).abs().max().item()


def _subprocess_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH, whether or not (or wherever) it is pip-installed."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath}


def _run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_subprocess_env(),
    )


# ----------------------------------------------------------------------------------------------------------
# Source checkpoints, one per format
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory):
    """A transformers Mamba folder, one safetensors file, with a tokenizer that lacks <image>."""
    folder = tmp_path_factory.mktemp("hf_lm")
    model = _tiny_lm()
    model.save_pretrained(folder)
    build_tokenizer(TEXTS, vocab_size=VOCAB, image_token="<img>").save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def hf_lm_sharded(tmp_path_factory):
    """A sharded transformers Mamba folder whose tokenizer already has <image>."""
    folder = tmp_path_factory.mktemp("hf_lm_sharded")
    model = _tiny_lm(seed=1)
    model.save_pretrained(folder, max_shard_size="20KB")
    build_tokenizer(TEXTS, vocab_size=VOCAB).save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder, model


def _ssm_state_dict(model: MambaForCausalLM) -> dict[str, torch.Tensor]:
    """transformers names -> original mamba_ssm names (what `MambaLMHeadModel.state_dict()` holds)."""
    renamed = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()
    }
    renamed["lm_head.weight"] = renamed["backbone.embedding.weight"]
    return renamed


@pytest.fixture(scope="module")
def ssm_lm(tmp_path_factory):
    """An original mamba_ssm folder: vocab 270 padded to 272, pytorch_model.bin, no tokenizer."""
    folder = tmp_path_factory.mktemp("ssm_lm")
    model = _tiny_lm(vocab_size=272, seed=2)
    config = {
        "d_model": 32,
        "n_layer": 2,
        "vocab_size": 270,
        "ssm_cfg": {"d_state": 8},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(_ssm_state_dict(model), folder / "pytorch_model.bin")
    return folder, model


@pytest.fixture(scope="module")
def hf_mamba2_lm(tmp_path_factory):
    """A folder written by transformers' Mamba2ForCausalLM.save_pretrained (untied lm_head), with a tokenizer
    that lacks <image>."""
    folder = tmp_path_factory.mktemp("hf_mamba2_lm")
    model = _tiny_mamba2_lm(seed=6)
    assert not model.config.tie_word_embeddings
    model.save_pretrained(folder)
    build_tokenizer(TEXTS, vocab_size=VOCAB, image_token="<img>").save_pretrained(folder)
    return folder, model


# An original mamba_ssm Mamba-2 LM: d_model 32, 2 layers, vocab 270 padded to 272, headdim 8 (8 heads), 2 groups,
# d_state 8, chunk_size 5 and a dt_limit that clamps, so that every mapped field matters.
SSM2_CONFIG = {
    "d_model": 32,
    "d_intermediate": 0,
    "n_layer": 2,
    "vocab_size": 270,
    "ssm_cfg": {
        "layer": "Mamba2",
        "d_state": 8,
        "headdim": 8,
        "ngroups": 2,
        "chunk_size": 5,
        "dt_limit": [0.0, 0.5],
    },
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}


def _ssm_mamba2_state_dict(seed: int = 7) -> dict[str, torch.Tensor]:
    """`MambaLMHeadModel(...).state_dict()` of SSM2_CONFIG, with mamba_ssm's names and `Mamba2`'s shapes."""
    gen = torch.Generator().manual_seed(seed)
    d_model, vocab, d_state, headdim, ngroups, d_conv = 32, 272, 8, 8, 2, 4
    d_inner = 2 * d_model  # expand 2; d_ssm = d_inner
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    d_in_proj = 2 * d_inner + 2 * ngroups * d_state + nheads  # [z, x, B, C, dt]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    sd = {"backbone.embedding.weight": rand(vocab, d_model, scale=1.0)}
    for i in range(2):
        prefix = f"backbone.layers.{i}."
        sd[prefix + "norm.weight"] = 1 + rand(d_model)
        sd[prefix + "mixer.in_proj.weight"] = rand(d_in_proj, d_model)
        sd[prefix + "mixer.conv1d.weight"] = rand(conv_dim, 1, d_conv, scale=0.5)
        sd[prefix + "mixer.conv1d.bias"] = rand(conv_dim)
        sd[prefix + "mixer.dt_bias"] = rand(nheads, scale=1.0)  # softplus spans the 0.5 limit
        sd[prefix + "mixer.A_log"] = torch.log(torch.empty(nheads).uniform_(1, 16, generator=gen))
        sd[prefix + "mixer.D"] = 1 + rand(nheads)
        sd[prefix + "mixer.norm.weight"] = 1 + rand(d_inner)
        sd[prefix + "mixer.out_proj.weight"] = rand(d_model, d_inner)
    sd["backbone.norm_f.weight"] = 1 + rand(d_model)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # tied, as MambaLMHeadModel saves it
    return sd


def _mamba2_reference(state_dict: dict[str, torch.Tensor]) -> Mamba2ForCausalLM:
    """transformers' Mamba2ForCausalLM with SSM2_CONFIG's shape, loaded with the mamba_ssm weights renamed."""
    config = _tiny_mamba2_config(
        272, time_step_limit=(0.0, 0.5), tie_word_embeddings=True, layer_norm_epsilon=1e-5
    )
    model = Mamba2ForCausalLM(config)
    renamed = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state_dict.items()}
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def _write_ssm_mamba2_folder(folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or SSM2_CONFIG))
    torch.save(_ssm_mamba2_state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def ssm_mamba2_lm(tmp_path_factory):
    """An original mamba_ssm Mamba-2 folder (config.json + pytorch_model.bin), no tokenizer."""
    folder = _write_ssm_mamba2_folder(tmp_path_factory.mktemp("ssm_mamba2_lm"))
    return folder, _mamba2_reference(_ssm_mamba2_state_dict())


@pytest.fixture(scope="module")
def vim_checkpoint(tmp_path_factory):
    """A Vim-format .pth: {"model", "model_ema", "args": Namespace, "optimizer", "epoch"} with a class head."""
    folder = tmp_path_factory.mktemp("vim")
    torch.manual_seed(3)
    tower = _randomize(VLMambaVisionModel(_tiny_vision_config(), mode="encoder"), seed=3)
    ema = _randomize(VLMambaVisionModel(_tiny_vision_config(), mode="encoder"), seed=4)
    head = {"head.weight": torch.randn(10, 16), "head.bias": torch.randn(10)}
    checkpoint = {
        "model": {**tower.state_dict(), **head},
        "model_ema": {**ema.state_dict(), **head},
        "args": argparse.Namespace(
            model="vim_tiny_patch8_32_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
            input_size=32,
        ),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
        "epoch": 299,
    }
    path = folder / "vim_t_midclstok.pth"
    torch.save(checkpoint, path)
    return path, tower, ema


@pytest.fixture(scope="module")
def vim_folder(vim_checkpoint, tmp_path_factory):
    """The Vim checkpoint converted to a VLMambaVisionModel folder."""
    return vim_conv.convert_vim(vim_checkpoint[0], tmp_path_factory.mktemp("vim_out") / "tower")


def _seed_state_dict(mode: str = "encoder", lora: bool = False) -> dict[str, torch.Tensor]:
    """The seed's `VLMamba(...).state_dict()` layout, width 32, 2+2 layers, vocab 100, 32x32 images, patch 8."""
    gen = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    mixer_shapes = {
        k: v.shape for k, v in VLMambaMixer(MambaConfig(hidden_size=32, state_size=4), 0).state_dict().items()
    }
    sd = {}
    if mode == "encoder":
        sd["vision_processor.patch_embed.weight"] = rand(32, 3, 8, 8)
        sd["vision_processor.patch_embed.bias"] = rand(32)
        for i in range(2):
            sd.update({f"vision_processor.layers.{i}.{k}": rand(*s) for k, s in mixer_shapes.items()})
        sd["vision_processor.norm.weight"], sd["vision_processor.norm.bias"] = rand(32), rand(32)
    else:
        sd["vision_processor.projection.weight"] = rand(32, 3 * 8 * 8)
        sd["vision_processor.projection.bias"] = rand(32)
    sd["vision_processor.pos_embed"] = rand(1, 16, 32)
    sd["bridger.net.0.weight"], sd["bridger.net.0.bias"] = rand(128, 32), rand(128)
    sd["bridger.net.2.weight"], sd["bridger.net.2.bias"] = rand(32, 128), rand(32)
    sd["bridger.net.3.weight"], sd["bridger.net.3.bias"] = rand(32), rand(32)
    sd["language_model.embedding.weight"] = rand(100, 32)
    for i in range(2):
        sd.update({f"language_model.layers.{i}.{k}": rand(*s) for k, s in mixer_shapes.items()})
    sd["language_model.norm.weight"], sd["language_model.norm.bias"] = rand(32), rand(32)
    sd["language_model.lm_head.weight"] = sd["language_model.embedding.weight"]
    if lora:
        base = "language_model.layers.0.in_proj"
        sd[f"{base}.linear.weight"] = sd.pop(f"{base}.weight")
        sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = rand(2, 32), rand(128, 2)
    return sd


# ----------------------------------------------------------------------------------------------------------
# Mamba LM -> VLMamba
# ----------------------------------------------------------------------------------------------------------


def test_hf_lm_conversion_matches_mamba_logits_and_adds_image_token(hf_lm, tmp_path):
    folder, source = hf_lm
    out = lm_conv.convert_mamba_lm(str(folder), tmp_path / "out", vision_config=None)
    config = VLMambaConfig.from_pretrained(out)
    tokenizer = _common.load_tokenizer(out)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert config.text_config.vocab_size == max(VOCAB, len(tokenizer)) >= config.image_token_id + 1
    assert _logits_diff(source, out, VOCAB, config.image_token_id) <= FP32_ATOL


def test_new_embedding_rows_are_the_mean_and_vocab_never_shrinks(hf_lm, tmp_path):
    folder, source = hf_lm
    out = lm_conv.convert_mamba_lm(str(folder), tmp_path / "out", image_token="<new_image>")
    model = VLMambaForConditionalGeneration.from_pretrained(str(out))
    rows = model.get_input_embeddings().weight.detach()
    old = source.backbone.embeddings.weight.detach()
    assert rows.shape[0] == VOCAB + 1  # the tokenizer had VOCAB tokens; one more for <new_image>
    torch.testing.assert_close(rows[:VOCAB], old)
    torch.testing.assert_close(rows[VOCAB], old.mean(0))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_sharded_hf_lm_with_existing_image_token_keeps_its_id(hf_lm_sharded, tmp_path):
    folder, source = hf_lm_sharded
    out = lm_conv.convert_mamba_lm(str(folder), tmp_path / "out")
    config = VLMambaConfig.from_pretrained(out)
    assert config.image_token_id == 4  # build_tokenizer's <image>
    assert config.text_config.vocab_size == VOCAB
    assert _logits_diff(source, out, VOCAB, 4) <= FP32_ATOL


def test_mamba_ssm_config_pads_vocab_and_maps_ssm_cfg():
    config = lm_conv.mamba_ssm_config_to_mamba_config(
        {
            "d_model": 64,
            "n_layer": 3,
            "vocab_size": 50277,
            "ssm_cfg": {"d_state": 8, "d_conv": 3, "expand": 3},
        }
    )
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (50280, 64, 3)
    assert (config.state_size, config.conv_kernel, config.expand, config.time_step_rank) == (8, 3, 3, 4)


def test_mamba_ssm_layer_picks_the_config_class():
    mamba1 = {"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"d_state": 8}}
    assert isinstance(lm_conv.mamba_ssm_config_to_hf_config(mamba1), MambaConfig)
    assert isinstance(lm_conv.mamba_ssm_config_to_hf_config(SSM2_CONFIG), Mamba2Config)
    with pytest.raises(NotImplementedError, match="mamba_ssm_config_to_mamba2_config"):
        lm_conv.mamba_ssm_config_to_mamba_config(SSM2_CONFIG)
    with pytest.raises(NotImplementedError, match="ssm_cfg.layer='Mamba3'"):
        lm_conv.mamba_ssm_config_to_hf_config({**mamba1, "ssm_cfg": {"layer": "Mamba3"}})


def test_mamba2_ssm_config_maps_fields_with_mamba_ssm_defaults():
    config = lm_conv.mamba_ssm_config_to_mamba2_config(
        {"d_model": 256, "n_layer": 3, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"}}
    )
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (50280, 256, 3)
    # mamba_ssm's Mamba2 defaults, not Mamba2Config's (n_groups 8).
    assert (config.state_size, config.conv_kernel, config.expand, config.head_dim) == (128, 4, 2, 64)
    assert (config.n_groups, config.chunk_size, config.num_heads) == (1, 256, 2 * 256 // 64)
    assert tuple(config.time_step_limit) == (0.0, float("inf"))
    assert (config.use_bias, config.use_conv_bias, config.layer_norm_epsilon) == (False, True, 1e-5)
    assert config.tie_word_embeddings and config.residual_in_fp32

    mapped = lm_conv.mamba_ssm_config_to_mamba2_config(SSM2_CONFIG)
    assert (mapped.state_size, mapped.head_dim, mapped.n_groups, mapped.num_heads) == (8, 8, 2, 8)
    assert (mapped.chunk_size, tuple(mapped.time_step_limit), mapped.vocab_size) == (5, (0.0, 0.5), 272)


def _with_ssm_cfg(**changes) -> dict:
    return {**SSM2_CONFIG, "ssm_cfg": {**SSM2_CONFIG["ssm_cfg"], **changes}}


@pytest.mark.parametrize(
    "config, field",
    [
        (_with_ssm_cfg(d_ssm=32), "ssm_cfg.d_ssm=32"),
        (_with_ssm_cfg(D_has_hdim=True), "ssm_cfg.D_has_hdim=True"),
        (_with_ssm_cfg(rmsnorm=False), "ssm_cfg.rmsnorm=False"),
        (_with_ssm_cfg(norm_before_gate=True), "ssm_cfg.norm_before_gate=True"),
        ({**SSM2_CONFIG, "attn_layer_idx": [1]}, "attn_layer_idx=[1]"),
    ],
)
def test_mamba2_variants_our_mixer_cannot_run_are_refused_naming_the_field(config, field):
    with pytest.raises(NotImplementedError) as error:
        lm_conv.mamba_ssm_config_to_mamba2_config(config)
    message = str(error.value)
    assert field in message and "convert" in message.lower()  # says which checkpoints do convert


def test_mamba2_options_equal_to_our_mixer_are_accepted():
    config = _with_ssm_cfg(
        d_ssm=64, D_has_hdim=False, rmsnorm=True, norm_before_gate=False, A_init_range=[1, 16]
    )
    assert lm_conv.mamba_ssm_config_to_mamba2_config(config).num_heads == 8


def test_mamba2_bad_dt_limit_and_unknown_ssm_cfg_keys_are_named():
    with pytest.raises(ValueError, match="ssm_cfg.dt_limit"):
        lm_conv.mamba_ssm_config_to_mamba2_config(_with_ssm_cfg(dt_limit=[0.5, 0.1]))
    with pytest.raises(ValueError, match="ssm_cfg.dt_rank"):  # a Mamba-1 option in a Mamba-2 config
        lm_conv.mamba_ssm_config_to_mamba2_config(_with_ssm_cfg(dt_rank=4))


def test_refused_mamba2_folder_fails_on_the_command_line_naming_the_field(tmp_path, capsys):
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_with_ssm_cfg(norm_before_gate=True)))
    args = ["--lm", str(folder), "--output", str(tmp_path / "out"), "--image-token-id", "270"]
    assert lm_conv.main(args) == 1
    assert "error: ssm_cfg.norm_before_gate=True" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mamba2_ssm_state_dict_is_renamed_and_checked():
    sd = _ssm_mamba2_state_dict()
    converted = lm_conv.convert_mamba_ssm_state_dict(sd, "mamba2")
    assert "backbone.embeddings.weight" in converted and "backbone.embedding.weight" not in converted
    assert set(converted) - {"backbone.embeddings.weight"} == set(sd) - {"backbone.embedding.weight"}
    with pytest.raises(ValueError, match="layers.0.mixer.x_proj.weight"):  # a Mamba-1 key in a Mamba-2 dict
        lm_conv.convert_mamba_ssm_state_dict(
            {**sd, "backbone.layers.0.mixer.x_proj.weight": torch.zeros(1)}, "mamba2"
        )


def test_transformers_mamba2_conversion_matches_its_logits_and_adds_image_token(hf_mamba2_lm, tmp_path):
    folder, source = hf_mamba2_lm
    out = lm_conv.convert_mamba_lm(str(folder), tmp_path / "out")
    config = VLMambaConfig.from_pretrained(out)
    assert isinstance(config.text_config, Mamba2Config) and not config.tie_word_embeddings
    tokenizer = _common.load_tokenizer(out)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert config.text_config.vocab_size == max(VOCAB, len(tokenizer)) == VOCAB + 1
    assert _logits_diff(source, out, VOCAB, config.image_token_id) <= FP32_ATOL
    model = VLMambaForConditionalGeneration.from_pretrained(str(out))
    old_embeddings, old_head = source.backbone.embeddings.weight.detach(), source.lm_head.weight.detach()
    torch.testing.assert_close(model.get_input_embeddings().weight[VOCAB], old_embeddings.mean(0))
    torch.testing.assert_close(
        model.lm_head.weight[:VOCAB], old_head
    )  # untied: its own rows, grown by the mean
    torch.testing.assert_close(model.lm_head.weight[VOCAB], old_head.mean(0))


def test_mamba_ssm_mamba2_conversion_matches_transformers_mamba2_on_the_mapped_weights(
    ssm_mamba2_lm, tmp_path
):
    folder, reference = ssm_mamba2_lm
    out = lm_conv.convert_mamba_lm(str(folder), tmp_path / "out", image_token_id=270)
    config = VLMambaConfig.from_pretrained(out)
    assert config.text_config.model_type == "mamba2" and config.text_config.vocab_size == 272
    assert tuple(config.text_config.time_step_limit) == (0.0, 0.5)
    assert _logits_diff(reference, out, 270, 270) <= FP32_ATOL
    # The reference really depends on the limit: without it, its logits move.
    free = Mamba2ForCausalLM(_tiny_mamba2_config(272, tie_word_embeddings=True)).eval()
    free.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 270, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (free(ids).logits - reference(ids).logits).abs().max() > 1e-3


def test_mamba2_folders_convert_on_the_command_line(hf_mamba2_lm, ssm_mamba2_lm, tmp_path):
    for name, folder, source, vocab in (
        ("hf", hf_mamba2_lm[0], hf_mamba2_lm[1], VOCAB),
        ("ssm", ssm_mamba2_lm[0], ssm_mamba2_lm[1], 270),
    ):
        out = tmp_path / name
        args = ("--lm", str(folder), "--output", str(out), "--image-token-id", str(vocab))
        result = _run_script("convert_mamba_lm_to_vlm_mamba.py", *args)
        assert result.returncode == 0, result.stderr
        assert "max |logits - Mamba2ForCausalLM logits|" in result.stdout
        assert _logits_diff(source, out, vocab, vocab) <= FP32_ATOL


def test_mamba_ssm_folder_cli_converts_with_parity(ssm_lm, vim_checkpoint, vim_folder, tmp_path):
    folder, source = ssm_lm
    vim_out = vim_folder
    result = _run_script(
        "convert_mamba_lm_to_vlm_mamba.py",
        *("--lm", str(folder), "--output", str(tmp_path / "out"), "--image-token-id", "270"),
        *("--vision", str(vim_out)),
    )
    assert result.returncode == 0, result.stderr
    assert "max |logits - MambaForCausalLM logits|" in result.stdout
    config = VLMambaConfig.from_pretrained(tmp_path / "out")
    assert config.text_config.vocab_size == 272 and config.image_token_id == 270  # a padding row, no growth
    assert _logits_diff(source, tmp_path / "out", 270, 270) <= FP32_ATOL
    model = VLMambaForConditionalGeneration.from_pretrained(str(tmp_path / "out"))
    for key, value in vim_checkpoint[1].state_dict().items():
        torch.testing.assert_close(model.model.vision_tower.state_dict()[key], value, rtol=0, atol=0)


def test_source_without_tokenizer_requires_image_token_id(ssm_lm, tmp_path):
    with pytest.raises(ValueError, match="--image-token-id"):
        lm_conv.convert_mamba_lm(str(ssm_lm[0]), tmp_path / "out")


def test_unknown_keys_are_all_listed():
    sd = {"backbone.embeddings.weight": torch.zeros(4, 2), "backbone.extra.weight": torch.zeros(1)}
    sd["backbone.layers.0.mlp.fc1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        lm_conv.lm_state_dict_to_vlm(sd)
    assert "backbone.extra.weight" in str(error.value) and "backbone.layers.0.mlp.fc1.weight" in str(
        error.value
    )
    with pytest.raises(ValueError, match="backbone.layers.0.attn.Wqkv.weight"):
        lm_conv.convert_mamba_ssm_state_dict({"backbone.layers.0.attn.Wqkv.weight": torch.zeros(1)})


def test_shape_mismatches_are_all_listed_with_both_shapes():
    model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4))
    sd = dict(model.state_dict())
    sd["backbone.norm_f.weight"] = torch.zeros(17)
    sd["backbone.layers.0.mixer.D"] = torch.zeros(3)
    sd["backbone.surprise"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        _common.load_checked(model, sd, "test weights")
    message = str(error.value)
    assert "backbone.norm_f.weight: checkpoint (17,) vs model (16,)" in message
    assert "backbone.layers.0.mixer.D: checkpoint (3,) vs model (32,)" in message
    assert "backbone.surprise" in message


def test_truncated_safetensors_gives_error_naming_the_file(hf_lm, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for item in hf_lm[0].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        lm_conv.convert_mamba_lm(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Payload:
    """Unpickling this would create a marker file: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_bin_with_arbitrary_pickled_object_is_refused(ssm_lm, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((ssm_lm[0] / "config.json").read_text())
    marker = tmp_path / "code_ran"
    torch.save(
        {"backbone.embedding.weight": torch.zeros(2), "x": _Payload(str(marker))},
        folder / "pytorch_model.bin",
    )
    with pytest.raises(_common.UnsafeCheckpointError, match="Refusing to load"):
        lm_conv.convert_mamba_lm(str(folder), tmp_path / "out", image_token_id=1)
    with pytest.raises(_common.UnsafeCheckpointError):
        vim_conv.load_vim_checkpoint(folder / "pytorch_model.bin")
    assert not marker.exists()


def test_hub_id_while_offline_gives_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as error:
        lm_conv.resolve_source("nobody-here/no-such-mamba-model-x")
    assert "HF_HUB_OFFLINE" in str(error.value) and "local folder" in str(error.value)


def test_existing_output_is_not_overwritten(hf_lm, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        lm_conv.convert_mamba_lm(str(hf_lm[0]), out)
    assert lm_conv.main(["--lm", str(hf_lm[0]), "--output", str(out)]) == 1
    assert "error:" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="would replace the input"):
        lm_conv.convert_mamba_lm(str(hf_lm[0]), hf_lm[0], overwrite=True)
    assert (hf_lm[0] / "config.json").is_file()
    lm_conv.convert_mamba_lm(str(hf_lm[0]), out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_failed_verification_saves_nothing(hf_lm, tmp_path):
    with pytest.raises(_common.ConversionError, match="Verification failed"):
        lm_conv.convert_mamba_lm(str(hf_lm[0]), tmp_path / "out", atol=-1.0)  # no difference passes
    assert list(tmp_path.iterdir()) == []


def test_fuyu_mode_and_vision_preset(hf_lm, tmp_path):
    out = lm_conv.convert_mamba_lm(
        str(hf_lm[0]), tmp_path / "out", vision_config="vim-tiny", vision_mode="fuyu"
    )
    config = VLMambaConfig.from_pretrained(out)
    assert config.vision_mode == "fuyu" and config.vision_config.hidden_size == 192


def test_vlm_checkpoint_as_vision_source_reuses_tower_and_projector(hf_lm, hf_lm_sharded, tmp_path):
    vision_json = tmp_path / "vision.json"
    vision_json.write_text(json.dumps(_tiny_vision_config().to_dict()))
    first = lm_conv.convert_mamba_lm(str(hf_lm[0]), tmp_path / "first", vision_config=str(vision_json))
    second = lm_conv.convert_mamba_lm(str(hf_lm_sharded[0]), tmp_path / "second", vision=str(first))
    a = VLMambaForConditionalGeneration.from_pretrained(str(first)).state_dict()
    b = VLMambaForConditionalGeneration.from_pretrained(str(second)).state_dict()
    shared = [k for k in a if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)


def test_vim_tower_brings_its_imagenet_normalisation_into_the_processor(hf_lm, vim_folder, tmp_path):
    out = lm_conv.convert_mamba_lm(str(hf_lm[0]), tmp_path / "out", vision=str(vim_folder))
    processor = VLMambaProcessor.from_pretrained(out)
    assert tuple(processor.image_processor.image_mean) == vim_conv.IMAGENET_MEAN
    assert processor.image_seq_length == VLMambaConfig.from_pretrained(out).num_image_tokens == 16


# ----------------------------------------------------------------------------------------------------------
# Vim -> vision tower
# ----------------------------------------------------------------------------------------------------------


def test_vim_conversion_reproduces_the_tower_and_drops_the_head(vim_checkpoint, tmp_path):
    path, tower, _ = vim_checkpoint
    state_dict, args = vim_conv.load_vim_checkpoint(path)
    weights, kwargs, dropped = vim_conv.vim_state_dict_to_vision(state_dict)
    assert dropped == ["head.bias", "head.weight"]
    assert all(kwargs[k] == getattr(tower.config, k) for k in kwargs)
    out = vim_conv.convert_vim(path, tmp_path / "out")
    converted = VLMambaVisionModel.from_pretrained(str(out)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixels).last_hidden_state, tower(pixels).last_hidden_state)


def test_vim_use_ema_selects_the_ema_weights(vim_checkpoint):
    path, tower, ema = vim_checkpoint
    state_dict, _ = vim_conv.load_vim_checkpoint(path, use_ema=True)
    assert torch.equal(
        state_dict["layers.0.mixer.in_proj.weight"], ema.state_dict()["layers.0.mixer.in_proj.weight"]
    )
    assert not torch.equal(state_dict["pos_embed"], tower.state_dict()["pos_embed"])


def test_vim_stride8_plus_checkpoint_converts_with_overlapping_patches(tmp_path):
    """A "+" model (kernel 16, stride 8 at 32 px: a 3x3 grid), stride read from args or from --image-size."""
    config = _tiny_vision_config(patch_size=16, patch_stride=8)
    tower = _randomize(VLMambaVisionModel(config, mode="encoder"), seed=6).eval()
    name = "vim_tiny_patch16_stride8_32_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    checkpoint = {"model": tower.state_dict(), "args": argparse.Namespace(model=name, input_size=32)}
    torch.save(checkpoint, tmp_path / "plus.pth")
    torch.save({"model": tower.state_dict()}, tmp_path / "plus_no_args.pth")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tower(pixels).last_hidden_state
    for source, size in (("plus.pth", None), ("plus_no_args.pth", 32)):
        out = vim_conv.convert_vim(tmp_path / source, tmp_path / f"out_{source}", image_size=size)
        converted = VLMambaVisionModel.from_pretrained(str(out)).eval()
        assert converted.config.patch_stride == 8 and converted.config.num_patches == 9
        with torch.no_grad():
            torch.testing.assert_close(converted(pixels).last_hidden_state, expected)
    state_dict, _ = vim_conv.load_vim_checkpoint(tmp_path / "plus.pth")
    with pytest.raises(ValueError, match="stride 32 must be from 1 to"):
        vim_conv.vim_state_dict_to_vision(state_dict, stride=32)
    with pytest.raises(ValueError, match="means 32px images, not the given image size 40"):
        vim_conv.vim_state_dict_to_vision(state_dict, image_size=40, stride=8)


def test_vim_unsupported_variants_list_their_keys(vim_checkpoint):
    state_dict, _ = vim_conv.load_vim_checkpoint(vim_checkpoint[0])
    variant = {**state_dict, "norm_f.bias": torch.zeros(16), "cls_token_head": torch.zeros(1, 1, 16)}
    with pytest.raises(ValueError) as error:
        vim_conv.vim_state_dict_to_vision(variant)
    assert "norm_f.bias" in str(error.value) and "cls_token_head" in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# Seed -> VLMamba
# ----------------------------------------------------------------------------------------------------------


def test_seed_encoder_weights_map_and_the_rest_is_reported():
    seed = _seed_state_dict("encoder")
    sd, config, report = seed_conv.seed_state_dict_to_vlm(seed)
    assert config.vision_mode == "encoder" and config.vision_config.image_size == 32
    assert not config.vision_config.use_cls_token and config.projector_expansion == 4
    assert torch.equal(
        sd["model.language_model.layers.1.mixer.x_proj.weight"], seed["language_model.layers.1.x_proj.weight"]
    )
    assert torch.equal(sd["model.vision_tower.layers.0.mixer.A_log"], seed["vision_processor.layers.0.A_log"])
    assert torch.equal(
        sd["model.vision_tower.patch_embed.proj.weight"], seed["vision_processor.patch_embed.weight"]
    )
    assert torch.equal(sd["model.multi_modal_projector.linear_2.bias"], seed["bridger.net.2.bias"])
    assert config.image_token_id == 100 and config.text_config.vocab_size == 101
    assert any("bridger.net.3.weight" in item for item in report.dropped)
    assert any("language_model.norm.bias" in item for item in report.dropped)
    assert any("layers.*.norm.weight" in item for item in report.fresh)
    assert any("conv1d_b.weight" in item for item in report.fresh)
    assert any("sqrt(32)" in note for note in report.notes)


def test_seed_fuyu_mode_maps_projection():
    seed = _seed_state_dict("fuyu")
    sd, config, _ = seed_conv.seed_state_dict_to_vlm(seed, image_token_id=7)
    assert config.vision_mode == "fuyu" and config.vision_config.patch_size == 8
    assert config.image_token_id == 7 and config.text_config.vocab_size == 100
    assert torch.equal(
        sd["model.vision_tower.patch_embed.proj.weight"], seed["vision_processor.projection.weight"]
    )


def test_seed_lora_is_merged_with_alpha_and_required():
    seed = _seed_state_dict("encoder", lora=True)
    with pytest.raises(ValueError, match="--lora-alpha"):
        seed_conv.seed_state_dict_to_vlm(seed)
    sd, _, _ = seed_conv.seed_state_dict_to_vlm(seed, lora_alpha=4.0)
    base = "language_model.layers.0.in_proj"
    expected = (
        seed[f"{base}.linear.weight"]
        + 2.0 * seed[f"{base}.lora_up.weight"] @ seed[f"{base}.lora_down.weight"]
    )
    torch.testing.assert_close(sd["model.language_model.layers.0.mixer.in_proj.weight"], expected)


def test_seed_unknown_keys_are_listed():
    seed = {**_seed_state_dict(), "language_model.pos_embed": torch.zeros(1), "extra.thing": torch.zeros(1)}
    with pytest.raises(ValueError) as error:
        seed_conv.seed_state_dict_to_vlm(seed)
    assert "language_model.pos_embed" in str(error.value) and "extra.thing" in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# CLIs
# ----------------------------------------------------------------------------------------------------------


def test_cli_help_runs_each_script_as_main():
    # One interpreter for the three --help runs keeps the test fast; each script runs as __main__.
    code = (
        "import os, runpy, sys\n"
        "for script in sys.argv[1:]:\n"
        "    sys.argv, sys.path[0] = [script, '--help'], os.path.dirname(script)  # as `python script`\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (script, exit.code)\n"
    )
    scripts = [str(SCRIPTS / name) for name in CLI_SCRIPTS]
    result = subprocess.run(
        [sys.executable, "-c", code, *scripts],
        capture_output=True,
        text=True,
        timeout=120,
        env=_subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    for name in CLI_SCRIPTS:
        assert f"usage: {name}" in result.stdout
    assert result.stdout.count("--overwrite") >= 3


def test_vim_cli_converts(vim_checkpoint, tmp_path):
    result = _run_script(
        "convert_vim_to_vlm_mamba.py",
        "--checkpoint",
        str(vim_checkpoint[0]),
        "--output",
        str(tmp_path / "o"),
        "--use-ema",
    )
    assert result.returncode == 0, result.stderr
    converted = VLMambaVisionModel.from_pretrained(str(tmp_path / "o"))
    assert torch.equal(converted.pos_embed, vim_checkpoint[2].pos_embed)


def test_seed_cli_converts_with_tokenizer_and_processor(tmp_path):
    torch.save({"model_state_dict": _seed_state_dict("encoder")}, tmp_path / "seed.pt")
    build_tokenizer(TEXTS, vocab_size=280, image_token="<img>").save_pretrained(tmp_path / "tok")
    args = (
        "--checkpoint",
        str(tmp_path / "seed.pt"),
        "--output",
        str(tmp_path / "o"),
        "--tokenizer",
        str(tmp_path / "tok"),
    )
    result = _run_script("convert_seed_checkpoint.py", *args)
    assert result.returncode == 0, result.stderr
    assert "freshly initialised" in result.stdout and "dropped" in result.stdout
    config = VLMambaConfig.from_pretrained(tmp_path / "o")
    tokenizer = _common.load_tokenizer(tmp_path / "o")
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert config.text_config.vocab_size >= len(tokenizer)
    assert (tmp_path / "o" / "processor_config.json").is_file()


def test_converted_folder_has_a_model_card_with_hub_metadata(tmp_path):
    import yaml

    torch.manual_seed(0)
    source = tmp_path / "lm"
    MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1)).save_pretrained(source)
    out = tmp_path / "out"
    lm_conv.convert_mamba_lm(str(source), out, image_token_id=63)
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["base_model"] == [str(source)]
    assert {"mamba", "state-space-model", "vision-language"} <= set(metadata["tags"])
    assert "verified equal" in card

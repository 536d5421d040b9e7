"""Shared tiny configs and helpers; every model here is built from a config (nothing is downloaded)."""

import pytest
import torch
from transformers import Mamba2Config, MambaConfig

_TINY_TEXT = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    state_size=8,
    expand=2,
    conv_kernel=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_text_config(**overrides) -> MambaConfig:
    return MambaConfig(**{**_TINY_TEXT, **overrides})


def tiny_mamba2_config(**overrides) -> Mamba2Config:
    # inner size 64 = 8 heads of 8 channels in 2 groups; chunk_size 16 < most test lengths.
    mamba2 = dict(head_dim=8, num_heads=8, n_groups=2, chunk_size=16)
    return Mamba2Config(**{**_TINY_TEXT, **mamba2, **overrides})


def make_lively(model: torch.nn.Module, seed: int = 0, scale: float = 2.0) -> torch.nn.Module:
    """Perturb weights so that a random model's greedy output varies from token to token.

    A freshly initialised tiny Mamba tends to repeat one token; tests of generation need outputs that
    change step to step, or a broken cache could go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("A_log", "A_b_log", "D", "D_b")) or "norm" in name:
                continue
            param.add_(torch.randn(param.shape, generator=gen) * scale * param.std().clamp(min=0.02))
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

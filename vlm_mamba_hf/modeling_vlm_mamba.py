"""VLMamba: an attention-free vision-language model built from Mamba blocks.

Parameter names follow transformers' Mamba (`embeddings`, `layers.i.norm`, `layers.i.mixer.*`, `norm_f`)
so that `MambaForCausalLM` checkpoints load unchanged, and the vision tower follows Vim's names
(`patch_embed.proj`, `cls_token`, `pos_embed`, the backward mixer's `*_b`) so that Vim checkpoints
convert by renaming.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mamba2Config, MambaConfig, PreTrainedConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin, LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .cache_vlm_mamba import VLMambaStateCache
from .configuration_vlm_mamba import VLMambaConfig, VLMambaVisionConfig, validate_mamba_text_config
from .cpu_kernels import kernels_available_for, mamba2_mixer_cpu, rms_norm_cpu
from .fused_loss import fused_causal_lm_loss
from .image_contrast import (
    ALPHA_KEY,
    DEFAULT_PLAUSIBILITY,
    PLAUSIBILITY_KEY,
    ImageContrastLogitsProcessor,
    check_contrast_settings,
    median_colour,
)
from .ops_ssd import DEFAULT_DT_LIMIT, causal_conv1d_rows, ssd_scan, ssd_state_update
from .ssm_ops import (
    causal_conv1d,
    causal_conv1d_update,
    kernel_available,
    mamba_inner,
    selective_scan,
    selective_state_update,
)

# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class VLMambaModelOutput(ModelOutput):
    """Backbone output: last hidden state (b, l, d), the recurrent cache, per-layer hidden states."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class VLMambaCausalLMOutput(ModelOutput):
    """LM output: loss, logits (b, l, vocab), the recurrent cache, hidden states, projected image features."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class VLMambaVisionOutput(ModelOutput):
    """Vision tower output: last_hidden_state (b, n, Dv) after the final norm, and every block's output."""

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------
# Mixers and blocks
# ----------------------------------------------------------------------------------------------------------


def _fused_norm(hidden_states: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None = None) -> bool:
    """Whether a norm can run the fused CPU kernel: fp32 input, weight and gate, and the kernels available."""
    if hidden_states.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if gate is not None and gate.dtype != torch.float32:
        return False
    return kernels_available_for(hidden_states)


class VLMambaRMSNorm(nn.Module):
    """RMSNorm computed in fp32: x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _fused_norm(hidden_states, self.weight):
            return rms_norm_cpu(hidden_states, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _SSMBranch:
    """Names of one scan direction's parameters on a mixer (forward: plain names; backward: Vim's `_b`)."""

    def __init__(self, conv1d: str, x_proj: str, dt_proj: str, A_log: str, D: str):
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = conv1d, x_proj, dt_proj, A_log, D


_FORWARD = _SSMBranch("conv1d", "x_proj", "dt_proj", "A_log", "D")
_BACKWARD = _SSMBranch("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _base_layer(module: nn.Module) -> nn.Module:
    """The module an adapter (PEFT) wraps, or the module itself."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


class _KeepSSMParametersFP32:
    """Mixin for mixers: A_log, D and the dt bias stay fp32 through `.to(bf16)`, `.half()`, `.bfloat16()`.

    As in mamba_ssm: exp(A), the skip D and softplus(delta + bias) are computed in fp32, and the parameters
    themselves would lose most of their precision in bf16 (log(3) -> 1.1016). Device moves and casts to
    fp32/fp64 apply to them as to every other tensor; only a cast to a half type passes them by, and their
    fp32 values are never rounded on the way. Loading with `dtype=torch.bfloat16` keeps them fp32 as well
    (`VLMambaPreTrainedModel._keep_in_fp32_modules_strict`).
    """

    def ssm_fp32_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        keep = set()
        for param in self.ssm_fp32_parameters():
            keep.add(id(param))
            if param.grad is not None:
                keep.add(id(param.grad))

        def apply_keeping_fp32(tensor):
            if id(tensor) in keep and tensor.dtype == torch.float32:
                target = fn(tensor.detach().new_empty(0))
                if target.dtype in _HALF_DTYPES:
                    return tensor.detach().to(device=target.device)
            return fn(tensor)

        return super()._apply(apply_keeping_fp32, recurse)


class VLMambaDeltaProjection(nn.Linear):
    """dt_proj: Linear(dt_rank -> d_inner) whose forward leaves its bias out; the scan adds it.

    The bias is the scan's `delta_bias` (mamba_ssm's convention): it is added to delta in fp32 right before
    the softplus, so it stays fp32 when the weights are bf16 (a bias near -5 rounded to bf16 would move dt by
    up to 3%). Keys stay `dt_proj.weight` / `dt_proj.bias`; an adapter wrapping this module (PEFT LoRA)
    adds its delta to the projection as usual.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=True)
        self.bias.data = self.bias.data.float()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input (..., dt_rank) -> delta before bias and softplus (..., d_inner)."""
        return F.linear(input, self.weight)


def _is_plain(module: nn.Module, cls: type) -> bool:
    """Whether `module` is exactly `cls` with no hook: no adapter wraps it (PEFT swaps in its own class), so a
    kernel or another layout may read its weight directly without skipping anything a module call would do."""
    return type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks


def _plain_projection(module: nn.Module) -> bool:
    """`_is_plain` for the projections whose weight `_project_bdl` reads; anything else is called as a module."""
    return _is_plain(module, nn.Linear) or _is_plain(module, VLMambaDeltaProjection)


def _kernel_layout(tensor: torch.Tensor) -> bool:
    """Whether the Mamba-1 scan of `tensor` runs on mamba_ssm's CUDA kernel, which reads (b, d, l) tensors
    whose last dimension is contiguous: the projections then write that layout directly (see `_project_bdl`)."""
    return kernel_available("selective_scan_fn", tensor.device)


def _project_bdl(linear: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """linear over (b, l, in) written as (b, out, l), last dimension contiguous: weight @ hidden^T.

    The same product as `linear(hidden).transpose(1, 2)`, without the transposing copy the kernels would
    otherwise make of each (b, d, l) operand (about a third of a 16k-token prefill on an H200). Only for a
    `_plain_projection`; VLMambaDeltaProjection's bias is left out, as its forward leaves it out.
    """
    out = torch.matmul(linear.weight, hidden_states.transpose(1, 2))
    if linear.bias is not None and type(linear) is nn.Linear:
        out = out + linear.bias[:, None].to(out.dtype)
    return out


class VLMambaMixer(_KeepSSMParametersFP32, nn.Module):
    """Mamba-1 selective SSM mixer (Gu & Dao 2023, Fig. 3), with transformers' parameter names.

    in_proj (d_model -> 2*d_inner) splits into x and the gate z; x runs through a causal depthwise
    conv, SiLU, and the selective scan whose delta, B, C come from x_proj/dt_proj; the output is gated
    by SiLU(z) and projected back by out_proj. Every projection is called as a module, so adapters
    wrapping them (PEFT LoRA) always take effect.
    """

    def __init__(self, config: MambaConfig | VLMambaVisionConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.ssm_state_size = config.state_size
        self.conv_kernel_size = config.conv_kernel
        self.time_step_rank = int(config.time_step_rank)
        self.activation = config.hidden_act
        self.time_step_scale = config.time_step_scale
        self.time_step_min = config.time_step_min
        self.time_step_max = config.time_step_max
        self.time_step_floor = config.time_step_floor
        self.time_step_init_scheme = config.time_step_init_scheme
        self.in_proj = nn.Linear(self.hidden_size, 2 * self.intermediate_size, bias=config.use_bias)
        self._add_branch(_FORWARD, config)
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)

    def _add_branch(self, names: _SSMBranch, config) -> None:
        d, n, r, k = self.intermediate_size, self.ssm_state_size, self.time_step_rank, self.conv_kernel_size
        conv = nn.Conv1d(d, d, kernel_size=k, groups=d, padding=k - 1, bias=config.use_conv_bias)
        self.add_module(names.conv1d, conv)
        self.add_module(names.x_proj, nn.Linear(d, r + 2 * n, bias=False))
        self.add_module(names.dt_proj, VLMambaDeltaProjection(r, d))
        self.register_parameter(names.A_log, nn.Parameter(torch.empty(d, n, dtype=torch.float32)))
        self.register_parameter(names.D, nn.Parameter(torch.empty(d, dtype=torch.float32)))
        getattr(self, names.A_log)._no_weight_decay = True
        getattr(self, names.D)._no_weight_decay = True

    def branches(self) -> tuple[_SSMBranch, ...]:
        return (_FORWARD,)

    def ssm_fp32_parameters(self) -> list[nn.Parameter]:
        """A_log, D and the dt bias of every scan direction (kept fp32 under half precision)."""
        params = []
        for names in self.branches():
            dt_bias = _base_layer(getattr(self, names.dt_proj)).bias
            params += [getattr(self, names.A_log), getattr(self, names.D), dt_bias]
        return params

    def state_shapes(self, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Decoding state: conv window (b, d_inner, conv_kernel) and SSM state (b, d_inner, state_size)."""
        d = self.intermediate_size
        return (batch_size, d, self.conv_kernel_size), (batch_size, d, self.ssm_state_size)

    @torch.no_grad()
    def init_ssm_parameters(self) -> None:
        """Mamba's init: A = -(1..N) (S4D-real), D = 1, dt bias = softplus^-1 of log-uniform dt."""
        for names in self.branches():
            A = torch.arange(1, self.ssm_state_size + 1, dtype=torch.float32)
            init.copy_(getattr(self, names.A_log), torch.log(A).expand(self.intermediate_size, -1).clone())
            init.ones_(getattr(self, names.D))
            dt_proj = getattr(self, names.dt_proj)
            std = self.time_step_rank**-0.5 * self.time_step_scale
            if self.time_step_init_scheme == "constant":
                init.constant_(dt_proj.weight, std)
            else:
                init.uniform_(dt_proj.weight, -std, std)
            log_lo, log_hi = math.log(self.time_step_min), math.log(self.time_step_max)
            dt = torch.exp(torch.rand(self.intermediate_size) * (log_hi - log_lo) + log_lo)
            dt = dt.clamp(min=self.time_step_floor)
            init.copy_(dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))
            conv = getattr(self, names.conv1d)
            init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
            if conv.bias is not None:
                init.zeros_(conv.bias)
        init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))

    def _scan(
        self,
        names: _SSMBranch,
        x: torch.Tensor,
        z: torch.Tensor,
        mask: torch.Tensor | None,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
        return_final_state: bool = False,
    ):
        """Conv + selective scan of one direction over x, z (b, d, l); returns y (b, d, l) [, final state]."""
        conv = getattr(self, names.conv1d)
        x = causal_conv1d(x, conv.weight.squeeze(1), conv.bias, conv_state, self.activation)
        if mask is not None:
            x = x * mask
        x_dbl = getattr(self, names.x_proj)(x.transpose(1, 2))
        dt, B, C = torch.split(x_dbl, [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        dt_proj = getattr(self, names.dt_proj)
        if _kernel_layout(x) and _plain_projection(dt_proj):
            dt = _project_bdl(dt_proj, dt)
        else:
            dt = dt_proj(dt).transpose(1, 2)
        A = -torch.exp(getattr(self, names.A_log).float())
        return selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=getattr(self, names.D),
            z=z,
            delta_bias=_base_layer(dt_proj).bias,
            delta_softplus=True,
            initial_state=ssm_state,
            return_final_state=return_final_state,
        )

    def _in_proj_bdl(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """in_proj of (b, l, d_model) as (b, 2*d_inner, l): x then the gate z along dim 1."""
        if _kernel_layout(hidden_states) and _plain_projection(self.in_proj):
            return _project_bdl(self.in_proj, hidden_states)
        return self.in_proj(hidden_states).transpose(1, 2)

    def _step(self, x: torch.Tensor, z: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decoding step; x, z (b, d); updates both states in place; returns y (b, d)."""
        x = causal_conv1d_update(
            x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation
        )
        dt, B, C = torch.split(
            self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
        )
        dt = self.dt_proj(dt)
        A = -torch.exp(self.A_log.float())
        dt_bias = _base_layer(self.dt_proj).bias
        return selective_state_update(
            ssm_state, x, dt, A, B, C, D=self.D, z=z, dt_bias=dt_bias, dt_softplus=True
        )

    def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """in_proj, then conv .. out_proj in mamba_ssm's one fused kernel (see `_can_use_fused_inner`)."""
        return mamba_inner(
            self.in_proj(hidden_states).transpose(1, 2),
            self.conv1d.weight,
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.out_proj.weight,
            self.out_proj.bias,
            -torch.exp(self.A_log.float()),
            self.D,
            self.dt_proj.bias,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model); reads and fills `cache` when given."""
        batch, seq_len, _ = hidden_states.shape
        mask = None
        if attention_mask is not None and seq_len > 1:
            mask = attention_mask[:, None, :].to(hidden_states.dtype)
            hidden_states = hidden_states * mask.transpose(1, 2)
        if cache is None and mask is None and _can_use_fused_inner(self):
            return self._fused_forward(hidden_states)
        x, z = self._in_proj_bdl(hidden_states).chunk(2, dim=1)
        if mask is not None:
            x = x * mask  # zero padded positions before the conv, whatever in_proj's bias

        conv_state = ssm_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx)
            ssm_state = cache.get_recurrent_state(self.layer_idx)
        if conv_state is not None and ssm_state is not None and seq_len == 1:
            y = self._step(x[..., 0], z[..., 0], conv_state, ssm_state)[:, None, :]
            return self.out_proj(y.to(hidden_states.dtype))

        if cache is not None:
            scanned, final_state = self._scan(_FORWARD, x, z, mask, conv_state, ssm_state, True)
            # Store the conv window only now: the cache updates its tensors in place.
            cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
            cache.update_recurrent_state(final_state, self.layer_idx)
        else:
            scanned = self._scan(_FORWARD, x, z, mask)
        return self.out_proj(scanned.transpose(1, 2).to(hidden_states.dtype))


_FUSED_INNER_MODULES = {
    "in_proj": nn.Linear,
    "conv1d": nn.Conv1d,
    "x_proj": nn.Linear,
    "dt_proj": VLMambaDeltaProjection,
    "out_proj": nn.Linear,
}


def _can_use_fused_inner(mixer: VLMambaMixer) -> bool:
    """Whether a Mamba-1 text mixer may run mamba_ssm's fused `mamba_inner_fn` instead of the unfused path.

    Only while training (where its recomputing backward saves memory), on CUDA with the kernel importable and
    enabled, with SiLU (the kernel's only activation), and when in_proj, conv1d, x_proj, dt_proj and out_proj
    are exactly their own classes with no hooks: the kernel reads their weights directly, so an adapter
    wrapping any of them (PEFT LoRA) or a hook on it would be silently skipped. The unfused path calls each
    as a module.
    """
    if not mixer.training or mixer.activation not in ("silu", "swish"):
        return False
    if not kernel_available("mamba_inner_fn", mixer.A_log.device):
        return False
    return all(_is_plain(getattr(mixer, name), cls) for name, cls in _FUSED_INNER_MODULES.items())


class VLMambaBiMixer(VLMambaMixer):
    """Vim's bidirectional Mamba mixer: shared in_proj/out_proj, one conv/x_proj/dt_proj/A/D per direction.

    The backward direction scans the reversed sequence (its parameters carry Vim's `_b` names); the two
    outputs are averaged before out_proj, so the feature at position i sees every position of the input.
    """

    def __init__(self, config: VLMambaVisionConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self._add_branch(_BACKWARD, config)

    def branches(self) -> tuple[_SSMBranch, ...]:
        return (_FORWARD, _BACKWARD)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None) -> torch.Tensor:
        x, z = self._in_proj_bdl(hidden_states).chunk(2, dim=1)
        y_fwd = self._scan(_FORWARD, x, z, None)
        y_bwd = self._scan(_BACKWARD, x.flip(-1), z.flip(-1), None).flip(-1)
        return self.out_proj(((y_fwd + y_bwd) / 2).transpose(1, 2).to(hidden_states.dtype))


class VLMambaGatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm (norm_before_gate=False): RMSNorm(y * SiLU(z)) per group of `group_size`
    channels, in fp32, times weight. One group per `n_groups`, as in mamba_ssm and transformers.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states, gate (..., hidden_size) -> (..., hidden_size) in hidden_states' dtype."""
        if _fused_norm(hidden_states, self.weight, gate):
            return rms_norm_cpu(hidden_states, self.weight, self.variance_epsilon, gate, self.group_size)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if gate is not None:
            hidden_states = hidden_states * F.silu(gate.to(torch.float32))
        grouped = hidden_states.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.flatten(-2).to(input_dtype)


class _SSDBranch:
    """Names of one Mamba-2 scan direction's parameters (forward: transformers' names; backward: `_b`)."""

    def __init__(self, conv1d: str, dt_bias: str, A_log: str, D: str):
        self.conv1d, self.dt_bias, self.A_log, self.D = conv1d, dt_bias, A_log, D


_SSD_FORWARD = _SSDBranch("conv1d", "dt_bias", "A_log", "D")
_SSD_BACKWARD = _SSDBranch("conv1d_b", "dt_bias_b", "A_b_log", "D_b")


class VLMambaMamba2Mixer(_KeepSSMParametersFP32, nn.Module):
    """Mamba-2 (SSD) mixer (Dao & Gu 2024, Fig. 6), with transformers' `Mamba2Mixer` parameter names.

    in_proj (d_model -> d_inner + conv_dim + heads) gives the gate z, xBC and dt; xBC = [x, B, C] runs
    through a causal depthwise conv and SiLU; the SSD scan (one scalar A per head, B and C shared by the
    heads of a group) produces y, which the gated RMSNorm multiplies by SiLU(z) and normalises per group
    before out_proj. Every projection is called as a module, so adapters wrapping them take effect.
    """

    def __init__(self, config: Mamba2Config | VLMambaVisionConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = int(config.expand * config.hidden_size)
        self.head_dim = config.head_dim
        self.num_heads = self.intermediate_size // self.head_dim
        self.n_groups = config.n_groups
        self.ssm_state_size = config.state_size
        self.chunk_size = config.chunk_size
        self.conv_kernel_size = config.conv_kernel
        self.activation = config.hidden_act
        self.time_step_min = config.time_step_min
        self.time_step_max = config.time_step_max
        self.time_step_floor = config.time_step_floor
        self.time_step_limit = tuple(getattr(config, "time_step_limit", (0.0, float("inf"))))
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.use_conv_bias = config.use_conv_bias
        projection_size = self.intermediate_size + self.conv_dim + self.num_heads
        self.in_proj = nn.Linear(self.hidden_size, projection_size, bias=config.use_bias)
        self._add_branch(_SSD_FORWARD)
        self.norm = VLMambaGatedRMSNorm(
            self.intermediate_size, self.intermediate_size // self.n_groups, eps=config.layer_norm_epsilon
        )
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)

    def _add_branch(self, names: _SSDBranch) -> None:
        k, h = self.conv_kernel_size, self.num_heads
        conv = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=k,
            groups=self.conv_dim,
            padding=k - 1,
            bias=self.use_conv_bias,
        )
        self.add_module(names.conv1d, conv)
        self.register_parameter(names.dt_bias, nn.Parameter(torch.empty(h, dtype=torch.float32)))
        self.register_parameter(names.A_log, nn.Parameter(torch.empty(h, dtype=torch.float32)))
        self.register_parameter(names.D, nn.Parameter(torch.empty(h, dtype=torch.float32)))
        getattr(self, names.A_log)._no_weight_decay = True
        getattr(self, names.D)._no_weight_decay = True
        getattr(self, names.dt_bias)._no_weight_decay = True

    def branches(self) -> tuple[_SSDBranch, ...]:
        return (_SSD_FORWARD,)

    def ssm_fp32_parameters(self) -> list[nn.Parameter]:
        """A_log, D and dt_bias of every scan direction (kept fp32 under half precision)."""
        return [getattr(self, n) for b in self.branches() for n in (b.A_log, b.D, b.dt_bias)]

    def state_shapes(self, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Decoding state: conv window (b, conv_dim, conv_kernel) and SSM state (b, heads, head_dim, state_size)."""
        conv = (batch_size, self.conv_dim, self.conv_kernel_size)
        return conv, (batch_size, self.num_heads, self.head_dim, self.ssm_state_size)

    @torch.no_grad()
    def init_ssm_parameters(self) -> None:
        """mamba_ssm's Mamba-2 init: A = -uniform[1, 16] per head, D = 1, dt bias = softplus^-1 of log-uniform dt."""
        for names in self.branches():
            A = torch.empty(self.num_heads).uniform_(1.0, 16.0)
            init.copy_(getattr(self, names.A_log), torch.log(A))
            init.ones_(getattr(self, names.D))
            log_lo, log_hi = math.log(self.time_step_min), math.log(self.time_step_max)
            dt = torch.exp(torch.rand(self.num_heads) * (log_hi - log_lo) + log_lo)
            dt = dt.clamp(min=self.time_step_floor)
            init.copy_(getattr(self, names.dt_bias), dt + torch.log(-torch.expm1(-dt)))
            conv = getattr(self, names.conv1d)
            init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
            if conv.bias is not None:
                init.zeros_(conv.bias)
        init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))

    def _split_xbc(self, xbc: torch.Tensor):
        """xBC (..., conv_dim) -> x (..., heads, head_dim), B and C (..., groups, state)."""
        gn = self.n_groups * self.ssm_state_size
        x, B, C = torch.split(xbc, [self.intermediate_size, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        return x, B.unflatten(-1, (self.n_groups, -1)), C.unflatten(-1, (self.n_groups, -1))

    def _scan(
        self,
        names: _SSDBranch,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        mask: torch.Tensor | None,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
        return_final_state: bool = False,
    ):
        """Conv + SSD of one direction over xBC (b, l, conv_dim) and dt (b, l, heads); y (b, l, heads, head_dim)."""
        conv = getattr(self, names.conv1d)
        xbc = causal_conv1d_rows(xbc, conv.weight.squeeze(1), conv.bias, conv_state, self.activation)
        if mask is not None:
            xbc = xbc * mask
        x, B, C = self._split_xbc(xbc)
        return ssd_scan(
            x,
            dt,
            -torch.exp(getattr(self, names.A_log).float()),
            B,
            C,
            self.chunk_size,
            D=getattr(self, names.D),
            dt_bias=getattr(self, names.dt_bias),
            dt_softplus=True,
            dt_limit=self.time_step_limit,
            initial_state=ssm_state,
            return_final_state=return_final_state,
        )

    def _step(self, xbc: torch.Tensor, dt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decoding step; xBC (b, conv_dim), dt (b, heads); updates both states in place; y (b, heads, head_dim)."""
        xbc = causal_conv1d_update(
            xbc, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation
        )
        x, B, C = self._split_xbc(xbc)
        A = -torch.exp(self.A_log.float())
        return ssd_state_update(
            ssm_state,
            x,
            dt,
            A,
            B,
            C,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.time_step_limit,
        )

    def _project(self, hidden_states: torch.Tensor, mask: torch.Tensor | None):
        """in_proj and split: z (b, l, d_inner), xBC (b, l, conv_dim) zeroed at padding, dt (b, l, heads)."""
        if mask is not None:
            hidden_states = hidden_states * mask
        return self._split_projection(self.in_proj(hidden_states), mask)

    def _split_projection(self, zxbcdt: torch.Tensor, mask: torch.Tensor | None):
        z, xbc, dt = torch.split(zxbcdt, [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        if mask is not None:
            xbc = xbc * mask  # zero padded positions before the conv, whatever in_proj's bias
        return z, xbc, dt

    def _can_fuse_on_cpu(self, zxbcdt: torch.Tensor) -> bool:
        """Whether conv .. gated norm may run as one fused CPU function (`cpu_kernels.mamba2_mixer_cpu`): CPU
        kernels available, fp32 or fp64 projections, SiLU, dt unclamped, and the conv and the norm exactly their
        own classes with no hook (the function reads their weights; the projections stay module calls)."""
        if zxbcdt.dtype not in (torch.float32, torch.float64) or self.activation not in ("silu", "swish"):
            return False
        if tuple(self.time_step_limit) != DEFAULT_DT_LIMIT:
            return False
        plain = _is_plain(self.conv1d, nn.Conv1d) and _is_plain(self.norm, VLMambaGatedRMSNorm)
        return plain and kernels_available_for(zxbcdt)

    def _fused_cpu_forward(
        self,
        zxbcdt: torch.Tensor,
        cache: Cache | None,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fused mixer; with a cache (a prefill, no gradients), continuing from its states (the cache's
        conv_state and ssm_state for this layer, None for zeros) and filling it."""
        conv = (self.conv1d.weight.squeeze(1), self.conv1d.bias)
        params = (*conv, self.dt_bias, -torch.exp(self.A_log.float()), self.D, self.norm.weight)
        sizes = dict(
            d_inner=self.intermediate_size,
            groups=self.n_groups,
            state=self.ssm_state_size,
            head_dim=self.head_dim,
            norm_group=self.norm.group_size,
            eps=self.norm.variance_epsilon,
        )
        if cache is None:
            return mamba2_mixer_cpu(zxbcdt, *params, **sizes)
        states = dict(conv_state=conv_state, ssm_state=ssm_state)
        y, final_state = mamba2_mixer_cpu(zxbcdt, *params, **sizes, **states, return_final_state=True)
        xbc = zxbcdt[..., self.intermediate_size : self.intermediate_size + self.conv_dim]
        cache.update_conv_state(xbc.transpose(1, 2), self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        cache.update_recurrent_state(final_state, self.layer_idx)
        return y

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model); reads and fills `cache` when given."""
        batch, seq_len, _ = hidden_states.shape
        mask = None
        if attention_mask is not None and seq_len > 1:
            mask = attention_mask[:, :, None].to(hidden_states.dtype)
        conv_state = ssm_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx)
            ssm_state = cache.get_recurrent_state(self.layer_idx)
        stepping = conv_state is not None and ssm_state is not None and seq_len == 1
        # The fused CPU mixer: training and full forwards, and cache prefills when no gradient is wanted.
        if mask is None and not stepping and (cache is None or not torch.is_grad_enabled()):
            zxbcdt = self.in_proj(hidden_states)
            if self._can_fuse_on_cpu(zxbcdt):
                y = self._fused_cpu_forward(zxbcdt, cache, conv_state, ssm_state)
                return self.out_proj(y.to(hidden_states.dtype))
            z, xbc, dt = self._split_projection(zxbcdt, None)
        else:
            z, xbc, dt = self._project(hidden_states, mask)

        if stepping:
            y = self._step(xbc[:, 0], dt[:, 0], conv_state, ssm_state)
            y = self.norm(y.reshape(batch, 1, -1), z)
            return self.out_proj(y.to(hidden_states.dtype))

        if cache is not None:
            y, final_state = self._scan(_SSD_FORWARD, xbc, dt, mask, conv_state, ssm_state, True)
            # Store the conv window only now: the cache updates its tensors in place.
            cache.update_conv_state(
                xbc.transpose(1, 2), self.layer_idx, conv_kernel_size=self.conv_kernel_size
            )
            cache.update_recurrent_state(final_state, self.layer_idx)
        else:
            y = self._scan(_SSD_FORWARD, xbc, dt, mask)
        y = self.norm(y.reshape(batch, seq_len, -1), z)
        return self.out_proj(y.to(hidden_states.dtype))


class VLMambaBiMamba2Mixer(VLMambaMamba2Mixer):
    """Bidirectional Mamba-2 mixer for the vision tower: shared in_proj/norm/out_proj, one conv1d/dt_bias/A/D
    per direction (the backward one with `_b` names, as in Vim); the backward direction scans the reversed
    sequence and the two scan outputs are averaged before the gated norm, so every position sees the whole input.
    """

    def __init__(self, config: VLMambaVisionConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self._add_branch(_SSD_BACKWARD)

    def branches(self) -> tuple[_SSDBranch, ...]:
        return (_SSD_FORWARD, _SSD_BACKWARD)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        z, xbc, dt = self._project(hidden_states, None)
        y_fwd = self._scan(_SSD_FORWARD, xbc, dt, None)
        y_bwd = self._scan(_SSD_BACKWARD, xbc.flip(1), dt.flip(1), None).flip(1)
        y = self.norm(((y_fwd + y_bwd) / 2).reshape(batch, seq_len, -1), z)
        return self.out_proj(y.to(hidden_states.dtype))


def _uses_mamba2(config) -> bool:
    """Mamba-2 mixers for a `Mamba2Config` language model or a vision config with `ssm_layer="mamba2"`."""
    return getattr(config, "model_type", None) == "mamba2" or getattr(config, "ssm_layer", None) == "mamba2"


class VLMambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(RMSNorm(x)), residual optionally kept in fp32."""

    def __init__(self, config, layer_idx: int, bidirectional: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = VLMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        if _uses_mamba2(config):
            mixer_cls = VLMambaBiMamba2Mixer if bidirectional else VLMambaMamba2Mixer
        else:
            mixer_cls = VLMambaBiMixer if bidirectional else VLMambaMixer
        self.mixer = mixer_cls(config, layer_idx=layer_idx)

    def forward(self, hidden_states, cache: Cache | None = None, attention_mask: torch.Tensor | None = None):
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(hidden_states, cache=cache, attention_mask=attention_mask)
        return residual + hidden_states


# ----------------------------------------------------------------------------------------------------------
# Pre-trained base
# ----------------------------------------------------------------------------------------------------------


class VLMambaPreTrainedModel(PreTrainedModel):
    """Owns the Mamba initialisation; `from_pretrained` never overwrites loaded weights (init.* respects it)."""

    config_class = VLMambaConfig
    base_model_prefix = "model"
    _no_split_modules = ["VLMambaBlock"]
    supports_gradient_checkpointing = True
    # In training mode with labels, the LM models compute the loss with the vocabulary projection fused in
    # (`fused_loss.py`): same loss and gradients, no (b, l, vocab) logits kept, and positions without a
    # target are never projected. `outputs.logits` is None then; set this to False (or call in eval mode)
    # to get the logits.
    fused_cross_entropy: bool = True
    _is_stateful = True
    _supports_sdpa = False
    _supports_flash_attn = False
    # Loaded as fp32 whatever `dtype` asks (regexes over parameter names); the mixers also keep them fp32
    # through `.to(dtype)` (`_KeepSSMParametersFP32`).
    _keep_in_fp32_modules_strict = [
        r"mixer\.A_log",
        r"mixer\.A_b_log",
        r"mixer\.D",
        r"mixer\.dt_proj(?:_b)?\.bias",
        r"mixer\.dt_bias",
    ]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, with mis-shaped tensors reported by name and both shapes in the error."""
        if cls.config_class is MambaConfig and not isinstance(kwargs.get("config"), PreTrainedConfig):
            kwargs = _with_mamba2_config(pretrained_model_name_or_path, kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err) or kwargs.get("ignore_mismatched_sizes"):
                raise
            kwargs.update(ignore_mismatched_sizes=True, output_loading_info=True)
            _, info = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            lines = [
                f"  {key}: checkpoint {tuple(a)} vs model {tuple(b)}" for key, a, b in info["mismatched_keys"]
            ]
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path} does not fit this model's config; "
                "mis-shaped tensors:\n"
                + "\n".join(lines)
                + "\nCheck that config.json belongs to these weights "
                "(or pass ignore_mismatched_sizes=True to re-initialise them)."
            ) from err

    def _prepare_static_cache(
        self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs
    ):
        """`generate(..., cache_implementation="static")`: our fixed-shape state (a recurrent state has no
        length to size for), kept on the model and reset for the next call of the same batch, dtype and
        device, so a captured decode step finds its buffers where it left them (as mamba_ssm's cg=True)."""
        cache = getattr(self, "_static_state_cache", None)
        dtype = self.get_input_embeddings().weight.dtype
        device = self.get_input_embeddings().weight.device
        layer = cache.layers[0] if cache is not None and cache.layers else None
        # Buffers made under torch.inference_mode() cannot be written outside it.
        stale = (
            layer is not None
            and layer.conv_states[0].is_inference()
            and not torch.is_inference_mode_enabled()
        )
        if (
            stale
            or layer is None
            or (layer.batch_size, layer.dtype, layer.device) != (batch_size, dtype, device)
        ):
            cache = self._static_state_cache = self.init_state_cache(batch_size)
        else:
            cache.reset()
        return cache

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (VLMambaMixer, VLMambaMamba2Mixer)):
            module.init_ssm_parameters()
        elif isinstance(module, VLMambaVisionModel):
            std = module.config.initializer_range
            init.trunc_normal_(module.pos_embed, std=std)
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, std=std)


_CONFIG_DOWNLOAD_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "proxies",
)


def _with_mamba2_config(pretrained_model_name_or_path, kwargs: dict) -> dict:
    """`from_pretrained` kwargs with `config` set to a `Mamba2Config` when the checkpoint's config.json is one.

    The text classes declare `config_class = MambaConfig`, which would read a Mamba-2 config.json as a Mamba-1
    config; config overrides passed as kwargs (Mamba2Config fields) are applied as transformers would.
    """
    config_path = kwargs.get("config") or pretrained_model_name_or_path
    if config_path is None:
        return kwargs
    download = {key: kwargs[key] for key in _CONFIG_DOWNLOAD_KWARGS if key in kwargs}
    config_dict, _ = PreTrainedConfig.get_config_dict(config_path, **download)
    if config_dict.get("model_type") != "mamba2":
        return kwargs
    kwargs = dict(kwargs)
    fields = {field.name for field in dataclasses.fields(Mamba2Config)} - {"dtype"}
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
    kwargs["config"] = Mamba2Config.from_dict(config_dict, **overrides)
    return kwargs


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of a (b, l) mask is ones followed by zeros (no padding on the left or inside)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _check_attention_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int, cache) -> None:
    if attention_mask is None:
        return
    decoding = cache is not None and len(cache) > 0 and cache.has_previous_state()
    if (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != batch
        or (attention_mask.shape[1] != seq_len and not decoding)
    ):
        raise ValueError(
            f"attention_mask must have shape (batch, seq_len) = ({batch}, {seq_len}), got "
            f"{tuple(attention_mask.shape)}. Pass the mask the tokenizer returned with input_ids."
        )


def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
    if input_ids.shape[1] == 0:
        raise ValueError("Empty input: input_ids has no tokens. Give at least one token (e.g. a BOS token).")
    # A traced decode step (torch.compile, CUDA graphs) must not read tensor values on the host.
    if (input_ids.device.type == "cpu" or input_ids.shape[1] > 1) and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"Token id {bad} is outside the vocabulary [0, {vocab_size}). Use the model's own tokenizer, "
                "or resize the embeddings with `model.resize_token_embeddings(len(tokenizer))`."
            )


class VLMambaTextModel(VLMambaPreTrainedModel):
    """The Mamba language-model backbone: embeddings -> Mamba blocks -> norm_f (transformers' key names)."""

    config_class = MambaConfig
    base_model_prefix = "backbone"

    def __init__(self, config: MambaConfig):
        validate_mamba_text_config(config)
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [VLMambaBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)]
        )
        self.norm_f = VLMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def init_state_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> VLMambaStateCache:
        """A fixed-shape decoding state for `batch_size` sequences, allocated now (CUDA-graph friendly)."""
        weight = self.embeddings.weight
        return VLMambaStateCache(
            [layer.mixer.state_shapes(batch_size) for layer in self.layers],
            conv_dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> VLMambaModelOutput | tuple:
        """input_ids (b, l) or inputs_embeds (b, l, d) -> last_hidden_state (b, l, d) and the cache."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            _check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embeddings(input_ids)
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(
                f"inputs_embeds must have shape (batch, seq_len>0, hidden), got {inputs_embeds.shape}."
            )
        batch, seq_len = inputs_embeds.shape[:2]
        _check_attention_mask(attention_mask, batch, seq_len, cache)
        if attention_mask is not None and attention_mask.shape[1] != seq_len:
            attention_mask = None  # decoding past the prompt: the state already holds the past
        if (
            self.training
            and cache is None
            and not output_hidden_states
            and attention_mask is not None
            and _is_right_padded(attention_mask)
        ):
            # Every layer is causal, so right padding never reaches the positions before it: the outputs at
            # real tokens (all a training loss reads) are the same without the mask, which costs three
            # multiplies per layer and their backward.
            attention_mask = None
        if attention_mask is not None and seq_len > 1 and not torch.compiler.is_compiling():
            if bool(attention_mask.all()):
                attention_mask = None  # no padding at all (a single prompt): the mask changes nothing
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, cache=cache, attention_mask=attention_mask)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm_f(hidden_states.to(self.norm_f.weight.dtype))
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return VLMambaModelOutput(
            last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states
        )


def _fused_loss_applies(model: PreTrainedModel, labels: torch.Tensor | None, kwargs: dict[str, Any]) -> bool:
    """Training with labels through a plain LM head: the fused projection + loss gives the same loss and
    gradients without the (b, l, vocab) logits. Not when an adapter or quantized layer wraps the head (the fused
    path reads `lm_head.weight` and would bypass it), nor when the weight is only gathered inside the head's own
    forward (DeepSpeed ZeRO-3 partitions, FSDP2 wraps the class), nor for caller-shifted labels."""
    if labels is None or not model.training or not model.fused_cross_entropy:
        return False
    head = model.lm_head
    return (
        type(head) is nn.Linear
        and head.bias is None
        and head.weight.numel() > 0
        and not hasattr(head.weight, "ds_id")
        and kwargs.get("shift_labels") is None
    )


def _logits_and_loss(
    model: PreTrainedModel,
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    logits_to_keep: int | torch.Tensor,
    vocab_size: int,
    loss_kwargs: dict[str, Any],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, loss) of an LM head: the fused loss without logits when it applies, else logits and
    `model.loss_function` over them (loss None without labels)."""
    if _fused_loss_applies(model, labels, loss_kwargs):
        weight = model.lm_head.weight
        return None, fused_causal_lm_loss(
            hidden_states, weight, labels, loss_kwargs.get("num_items_in_batch")
        )
    logits = _lm_logits(model.lm_head, hidden_states, logits_to_keep)
    if labels is None:
        return logits, None
    return logits, model.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **loss_kwargs)


def _lm_logits(lm_head: nn.Linear, hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor):
    if isinstance(logits_to_keep, int):
        hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
    else:
        hidden_states = hidden_states[:, logits_to_keep]
    return lm_head(hidden_states.to(lm_head.weight.dtype)).float()


class VLMambaForCausalLM(VLMambaPreTrainedModel, GenerationMixin):
    """Text-only Mamba language model with tied LM head; loads `MambaForCausalLM` checkpoints unchanged."""

    config_class = MambaConfig
    base_model_prefix = "backbone"
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: MambaConfig):
        super().__init__(config)
        self.backbone = VLMambaTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.embeddings

    def set_input_embeddings(self, value):
        self.backbone.embeddings = value

    def init_state_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> VLMambaStateCache:
        """A fixed-shape decoding state for `batch_size` sequences (batch x beams), allocated now."""
        return self.backbone.init_state_cache(batch_size, device, dtype)

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, attention_mask=None, use_cache=None, is_first_iteration=False, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            use_cache=use_cache,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VLMambaCausalLMOutput | tuple:
        """Causal-LM forward: logits (b, l, vocab) and, with labels, the shifted cross-entropy loss."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            attention_mask=attention_mask,
        )
        logits, loss = _logits_and_loss(
            self, outputs.last_hidden_state, labels, logits_to_keep, self.config.vocab_size, kwargs
        )
        result = VLMambaCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
        return result if return_dict else result.to_tuple()


# ----------------------------------------------------------------------------------------------------------
# Vision tower and bridger
# ----------------------------------------------------------------------------------------------------------


# How steeply `foreground_map` saturates: a colour distance of 1 (in normalized pixel units, where the image
# processor's default range is [-1, 1]) maps to tanh(3) = 0.995 of the way to "foreground".
FOREGROUND_GAIN = 3.0


def foreground_map(pixel_values: torch.Tensor) -> torch.Tensor:
    """(b, c, H, W) pixels -> (b, 1, H, W): how far each pixel's colour is from its image's per-channel median
    colour, squashed to [-1, 1] (-1: the median colour itself). On a plain background it is a soft mask of the
    objects that does not depend on their colour; an image filled with its median colour gives -1 everywhere.
    A fixed function of the pixels: no gradient flows back through it."""
    pixels = pixel_values.detach()
    median = median_colour(pixels)
    distance = (pixels - median[:, :, None, None]).square_().sum(dim=1, keepdim=True).sqrt_()
    return distance.mul_(FOREGROUND_GAIN).tanh_().mul_(2).sub_(1)


# Keeps `foreground_colour` finite in patches with no foreground at all (there it is 0).
FOREGROUND_COLOUR_EPS = 1e-3


def foreground_colour(
    pixel_values: torch.Tensor, foreground: torch.Tensor, patch_size: int, stride: int
) -> torch.Tensor:
    """(b, c, H, W) pixels and their (b, 1, H, W) `foreground_map` -> (b, rows * cols, c): the mean colour of each
    patch's foreground pixels, each pixel weighted by how foreground it is ((map + 1) / 2, in [0, 1]); about 0 in
    a patch of background only. Patches in row-major order, as `VLMambaPatchEmbed` lays them out."""
    weight = foreground.add(1).mul_(0.5)
    total = F.avg_pool2d(pixel_values * weight, patch_size, stride)
    mass = F.avg_pool2d(weight, patch_size, stride)
    return (total / (mass + FOREGROUND_COLOUR_EPS)).flatten(2).transpose(1, 2)


class VLMambaPatchEmbed(nn.Module):
    """Patches -> features: Conv2d in encoder mode (overlapping when `patch_stride` < `patch_size`), Linear over
    flattened non-overlapping patches in fuyu mode. With `foreground_channel`, `foreground_map` is appended to
    the pixels as one more input channel.

    With `factored_patches`, `proj` sees the foreground map alone (one channel) and `colour_proj` the mean colour
    of each patch's foreground (`foreground_colour`); a patch's feature is the sum of the two. Each part is then
    the same for a shape in any colour, or a colour on any shape, as in training."""

    def __init__(self, config: VLMambaVisionConfig, mode: str):
        super().__init__()
        self.mode = mode
        self.patch_size = config.patch_size
        self.stride = config.stride
        self.num_channels = config.num_channels
        self.foreground_channel = config.foreground_channel
        self.factored = config.factored_patches
        if self.factored:
            in_channels = 1
            self.colour_proj = nn.Linear(config.num_channels, config.hidden_size)
        else:
            in_channels = config.num_channels + int(config.foreground_channel)
        p = config.patch_size
        if mode == "encoder":
            self.proj = nn.Conv2d(in_channels, config.hidden_size, kernel_size=p, stride=config.stride)
        else:
            config.check_stride_for_mode(mode)
            self.proj = nn.Linear(in_channels * p * p, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """pixel_values (b, c, H, W) -> patches (b, rows * cols, Dv) in row-major order, and the grid (rows, cols)."""
        colour = None
        if self.factored:
            foreground = foreground_map(pixel_values)
            colour = self.colour_proj(
                foreground_colour(pixel_values, foreground, self.patch_size, self.stride)
            )
            pixel_values = foreground
        elif self.foreground_channel:
            pixel_values = torch.cat([pixel_values, foreground_map(pixel_values)], dim=1)
        b, c, height, width = pixel_values.shape
        p = self.patch_size
        if self.mode == "encoder":
            features = self.proj(pixel_values)
            grid = (features.shape[2], features.shape[3])
            features = features.flatten(2).transpose(1, 2)
        else:
            grid = (height // p, width // p)
            # Fuyu order: each patch flattened as (row, column, channel).
            patches = pixel_values.reshape(b, c, grid[0], p, grid[1], p).permute(0, 2, 4, 3, 5, 1)
            features = self.proj(patches.reshape(b, grid[0] * grid[1], p * p * c))
        return (features if colour is None else features + colour), grid


class VLMambaVisionModel(VLMambaPreTrainedModel):
    """Vision tower. Encoder mode: Vim (patch embed, mid class token, pos embed, bidirectional Mamba blocks,
    final RMSNorm). Fuyu mode: one Linear over flattened patches plus the position embedding.
    """

    config_class = VLMambaVisionConfig
    base_model_prefix = "vision_tower"
    main_input_name = "pixel_values"

    def __init__(self, config: VLMambaVisionConfig, mode: str | None = None):
        config.validate_architecture()
        super().__init__(config)
        mode = mode if mode is not None else config.mode
        if mode not in ("encoder", "fuyu"):
            raise ValueError(f"vision mode must be 'encoder' or 'fuyu', got {mode!r}.")
        self.mode = mode
        self.patch_embed = VLMambaPatchEmbed(config, mode)
        use_cls = mode == "encoder" and config.use_cls_token
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + int(use_cls), config.hidden_size))
        depth = config.num_hidden_layers if mode == "encoder" else 0
        self.layers = nn.ModuleList([VLMambaBlock(config, i, bidirectional=True) for i in range(depth)])
        self.norm_f = VLMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon) if depth else None
        self.gradient_checkpointing = False
        self.post_init()

    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a patch grid, bicubically interpolated when it differs from the config's."""
        side = self.config.grid_side()
        pos = self.pos_embed
        if grid == (side, side):
            return pos
        cls_pos = None
        if self.cls_token is not None:
            mid = side * side // 2
            cls_pos = pos[:, mid : mid + 1]
            pos = torch.cat([pos[:, :mid], pos[:, mid + 1 :]], dim=1)
        pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=grid, mode="bicubic", align_corners=False).to(
            self.pos_embed.dtype
        )
        pos = pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        if cls_pos is not None:
            mid = grid[0] * grid[1] // 2
            pos = torch.cat([pos[:, :mid], cls_pos, pos[:, mid:]], dim=1)
        return pos

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> VLMambaVisionOutput | tuple:
        """pixel_values (b, c, H, W) -> features (b, n, Dv); n = patches (+1 class token in encoder mode)."""
        check_pixel_values(pixel_values, self.config)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        dtype = self.patch_embed.proj.weight.dtype
        x, grid = self.patch_embed(pixel_values.to(dtype))
        if self.cls_token is not None:
            mid = x.shape[1] // 2
            x = torch.cat([x[:, :mid], self.cls_token.expand(x.shape[0], -1, -1), x[:, mid:]], dim=1)
        x = x + self._position_embedding(grid)
        hidden_states = (x,)
        for layer in self.layers:
            x = layer(x)
            hidden_states += (x,)
        if self.norm_f is not None:
            x = self.norm_f(x.to(self.norm_f.weight.dtype))
            hidden_states = hidden_states[:-1] + (x,)
        out = VLMambaVisionOutput(
            last_hidden_state=x, hidden_states=hidden_states if output_hidden_states else None
        )
        return out if return_dict else out.to_tuple()


def check_pixel_values(pixel_values: torch.Tensor, config: VLMambaVisionConfig) -> None:
    """Clear errors for pixel tensors the tower cannot take (the image processor produces valid ones)."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(
            f"pixel_values must be a tensor of shape (num_images, {config.num_channels}, height, width), got "
            f"{shape}. Use the VLMambaImageProcessor to prepare images."
        )
    _, channels, height, width = pixel_values.shape
    p = config.patch_size
    if channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels, the vision tower expects {config.num_channels}."
        )
    stride = config.stride
    if height < p or width < p or (height - p) % stride or (width - p) % stride:
        what = (
            f"a positive multiple of the patch size {p}"
            if stride == p
            else f"the patch size {p} plus a multiple of the patch stride {stride}"
        )
        raise ValueError(
            f"Image size {height}x{width} is not {what}. The image processor resizes images to "
            f"{config.image_size}x{config.image_size}; use it, or resize to such a size."
        )
    if pixel_values.is_floating_point() and not torch.isfinite(pixel_values).all():
        raise ValueError(
            "pixel_values contains NaN or infinite values; check the image decoding/normalisation."
        )


class VLMambaMultiModalProjector(nn.Module):
    """The bridger: [LayerNorm] -> Linear(Dv, e*Dv) -> act -> Linear(e*Dv, Dt)."""

    def __init__(self, config: VLMambaConfig):
        super().__init__()
        dv, dt = config.vision_config.hidden_size, config.text_config.hidden_size
        hidden = config.projector_expansion * dv
        self.norm = nn.LayerNorm(dv) if config.projector_layernorm else None
        self.linear_1 = nn.Linear(dv, hidden, bias=config.projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, dt, bias=config.projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            image_features = self.norm(image_features)
        return self.linear_2(self.act(self.linear_1(image_features)))


# ----------------------------------------------------------------------------------------------------------
# The VLM
# ----------------------------------------------------------------------------------------------------------


class VLMambaModel(VLMambaPreTrainedModel):
    """Vision tower + bridger + Mamba language model; image features replace the `<image>` token embeddings."""

    config_class = VLMambaConfig

    def __init__(self, config: VLMambaConfig):
        super().__init__(config)
        self.vision_tower = VLMambaVisionModel(config.vision_config, mode=config.vision_mode)
        self.multi_modal_projector = VLMambaMultiModalProjector(config)
        self.language_model = VLMambaTextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embeddings

    def set_input_embeddings(self, value):
        self.language_model.embeddings = value

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """pixel_values (num_images, c, H, W) -> projected features (num_images, num_image_tokens, Dt)."""
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layer = self.config.vision_feature_layer
        features = out.hidden_states[layer] if self.config.vision_mode == "encoder" else out.last_hidden_state
        tower = self.vision_tower
        if tower.cls_token is not None and not self.config.vision_config.keep_cls_token:
            mid = (features.shape[1] - 1) // 2
            features = torch.cat([features[:, :mid], features[:, mid + 1 :]], dim=1)
        return self.multi_modal_projector(features)

    def _merge_image_features(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
    ):
        """Write image features at the image-token positions; with none, prefix one image per sample."""
        num_images, per_image, _ = image_features.shape
        if input_ids is not None:
            is_image = input_ids == self.config.image_token_id
        else:
            image_embed = self.get_input_embeddings().weight[self.config.image_token_id]
            is_image = (inputs_embeds == image_embed.to(inputs_embeds.dtype)).all(-1)
        n_tokens = int(is_image.sum())
        if n_tokens == 0:
            batch = inputs_embeds.shape[0]
            if num_images != batch:
                raise ValueError(
                    f"The text has no image tokens and {num_images} images were given for a batch of {batch}: "
                    "without image tokens each sample takes exactly one image, prefixed to its text. Put the "
                    "processor's image token in the text to place images explicitly."
                )
            features = image_features.to(inputs_embeds.dtype)
            inputs_embeds = torch.cat([features, inputs_embeds], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(batch, per_image), attention_mask], dim=1)
            if labels is not None:
                labels = torch.cat([labels.new_full((batch, per_image), -100), labels], dim=1)
            return inputs_embeds, attention_mask, labels
        if n_tokens != num_images * per_image:
            raise ValueError(
                f"The number of image tokens in the text ({n_tokens}) does not match the image features: "
                f"{num_images} image(s) x {per_image} tokens = {num_images * per_image}. Prepare inputs with the "
                "VLMambaProcessor, which expands each <image> into exactly that many tokens."
            )
        inputs_embeds = inputs_embeds.masked_scatter(
            is_image[..., None].expand_as(inputs_embeds), image_features.to(inputs_embeds.dtype)
        )
        if labels is not None:
            labels = labels.masked_fill(is_image, -100)
        return inputs_embeds, attention_mask, labels

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ):
        """Fuse images into the token sequence and run the language model. Returns (output, labels)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        text_config = self.config.text_config
        if inputs_embeds is None:
            _check_input_ids(input_ids, text_config.vocab_size)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        prefill = cache is None or len(cache) == 0 or not cache.has_previous_state()
        image_features = None
        if pixel_values is not None and prefill:
            image_features = self.get_image_features(pixel_values)
            inputs_embeds, attention_mask, labels = self._merge_image_features(
                input_ids, inputs_embeds, image_features, attention_mask, labels
            )
        elif prefill and input_ids is not None and bool((input_ids == self.config.image_token_id).any()):
            raise ValueError(
                "input_ids contain image tokens but no pixel_values were given. Pass the image(s) with "
                "pixel_values, or remove the <image> tokens from the text."
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            attention_mask=attention_mask,
        )
        outputs.image_hidden_states = image_features
        return outputs, labels


class VLMambaForConditionalGeneration(VLMambaPreTrainedModel, GenerationMixin):
    """VLMamba for image-text-to-text: captioning and VQA with `generate()` on a recurrent-state cache."""

    config_class = VLMambaConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embeddings.weight"}

    def __init__(self, config: VLMambaConfig):
        super().__init__(config)
        self.model = VLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def multi_modal_projector(self):
        return self.model.multi_modal_projector

    @property
    def language_model(self):
        return self.model.language_model

    def init_state_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> VLMambaStateCache:
        """A fixed-shape decoding state for `batch_size` sequences (batch x beams), allocated now."""
        return self.model.language_model.init_state_cache(batch_size, device, dtype)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        pixel_values=None,
        use_cache=None,
        is_first_iteration=False,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            use_cache=use_cache,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or not use_cache:
            model_inputs["pixel_values"] = pixel_values
        else:
            model_inputs["pixel_values"] = None
            model_inputs["attention_mask"] = None
        return model_inputs

    def generate(self, inputs=None, generation_config=None, logits_processor=None, **kwargs):
        """`GenerationMixin.generate`, plus image-contrastive decoding (`vlm_mamba_hf.image_contrast`): pass
        `image_contrast=alpha` (> 0 turns it on) and optionally `image_contrast_plausibility`, or set them in
        the generation config. Calls without `pixel_values` decode as usual."""
        config = generation_config if generation_config is not None else self.generation_config
        alpha = kwargs.pop(ALPHA_KEY, None)
        plausibility = kwargs.pop(PLAUSIBILITY_KEY, None)
        alpha = getattr(config, ALPHA_KEY, 0.0) if alpha is None else alpha
        plausibility = (
            getattr(config, PLAUSIBILITY_KEY, DEFAULT_PLAUSIBILITY) if plausibility is None else plausibility
        )
        pixel_values = kwargs.get("pixel_values")
        if alpha and pixel_values is not None:
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            if input_ids is None:
                raise ValueError(
                    f"{ALPHA_KEY} needs the prompt as input_ids (it reruns the prompt on a contrast image); "
                    f"pass input_ids, or set {ALPHA_KEY}=0 to generate from inputs_embeds."
                )
            if kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1) > 1:
                raise ValueError(
                    f"{ALPHA_KEY} works with greedy decoding and sampling, not beam search (the contrast "
                    f"branch does not follow beam reordering); set num_beams=1 or {ALPHA_KEY}=0."
                )
            contrast = ImageContrastLogitsProcessor(
                self, input_ids, pixel_values, kwargs.get("attention_mask"), alpha, plausibility
            )
            logits_processor = LogitsProcessorList([*(logits_processor or []), contrast])
        elif alpha:
            check_contrast_settings(alpha, plausibility)
        return super().generate(inputs, generation_config, logits_processor, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VLMambaCausalLMOutput | tuple:
        """logits (b, l, vocab) for text with images fused at `<image>` tokens; loss ignores image positions."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs, labels = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            labels=labels,
        )
        vocab = self.config.text_config.vocab_size
        logits, loss = _logits_and_loss(
            self, outputs.last_hidden_state, labels, logits_to_keep, vocab, kwargs
        )
        result = VLMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )
        return result if return_dict else result.to_tuple()


__all__ = [
    "VLMambaPreTrainedModel",
    "VLMambaTextModel",
    "VLMambaForCausalLM",
    "VLMambaVisionModel",
    "VLMambaMultiModalProjector",
    "VLMambaModel",
    "VLMambaForConditionalGeneration",
    "VLMambaMixer",
    "VLMambaBiMixer",
    "VLMambaMamba2Mixer",
    "VLMambaBiMamba2Mixer",
    "VLMambaBlock",
]

"""A fixed-shape recurrent-state cache for decoding under `torch.compile` and CUDA graphs.

transformers' `DynamicCache` allocates each layer's conv window and SSM state at the first forward and
replaces them on beam-search reordering (`index_select`), so their addresses change during `generate`.
A captured decode step (CUDA graph) reads and writes fixed addresses: here every buffer is allocated once,
up front, marked as a static address for `torch.compile`, and only ever written in place (`copy_`): the
prefill copies its final states in, each decode step updates them in place, beam search reorders them in
place. The layers are transformers' `LinearAttentionLayer`s, so the models' code reads and fills this
cache exactly as it does a `DynamicCache` (`get_conv_state`, `update_recurrent_state`, ...).

`model.generate(..., cache_implementation="static")` builds one (VLMamba models override
`_prepare_static_cache`); transformers then compiles the decode step with `generation_config.compile_config`
(default `mode="reduce-overhead"`: CUDA graphs) on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer

StateShapes = tuple[tuple[int, ...], tuple[int, ...]]


class VLMambaStateLayer(LinearAttentionLayer):
    """One Mamba layer's decoding state, allocated at construction: conv window (b, c, k), SSM state (b, ...).

    The SSM state is fp32 whatever the activations' dtype (as mamba_ssm keeps it); the conv window holds
    activations. `has_previous_state` stays False until a prefill has copied its states in.
    """

    def __init__(
        self,
        conv_shape: Sequence[int],
        recurrent_shape: Sequence[int],
        conv_dtype: torch.dtype,
        device: torch.device | str,
        recurrent_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(number_of_states=1)
        if conv_shape[0] != recurrent_shape[0]:
            raise ValueError(
                f"The conv window {tuple(conv_shape)} and the SSM state {tuple(recurrent_shape)} must have the "
                "same batch size (dim 0)."
            )
        self.device, self.dtype = torch.device(device), conv_dtype
        self.batch_size = conv_shape[0]
        self.conv_kernel_size[0] = conv_shape[-1]
        self.conv_states[0] = torch.zeros(tuple(conv_shape), dtype=conv_dtype, device=self.device)
        self.recurrent_states[0] = torch.zeros(
            tuple(recurrent_shape), dtype=recurrent_dtype, device=self.device
        )
        torch._dynamo.mark_static_address(self.conv_states[0])
        torch._dynamo.mark_static_address(self.recurrent_states[0])
        self.is_conv_states_initialized[0] = True
        self.is_recurrent_states_initialized[0] = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes old row beam_idx[i], written into the same buffers."""
        for states in (self.conv_states[0], self.recurrent_states[0]):
            states.copy_(states.index_select(0, beam_idx.to(states.device)))


class VLMambaStateCache(Cache):
    """Fixed-shape, preallocated recurrent state for every Mamba layer of a VLMamba language model.

    Build it with `model.init_state_cache(batch_size)` (or let `generate(..., cache_implementation="static")`
    do it); `batch_size` counts every sequence the model sees at once (batch x num_beams for beam search).
    `reset()` zeroes it for reuse; the buffers never move.
    """

    def __init__(
        self,
        state_shapes: Sequence[StateShapes],
        conv_dtype: torch.dtype,
        device: torch.device | str,
        recurrent_dtype: torch.dtype = torch.float32,
    ):
        layers = [
            VLMambaStateLayer(conv_shape, recurrent_shape, conv_dtype, device, recurrent_dtype)
            for conv_shape, recurrent_shape in state_shapes
        ]
        super().__init__(layers=layers)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every buffer of the cache (conv windows and SSM states, layer by layer)."""
        return [t for layer in self.layers for t in (layer.conv_states[0], layer.recurrent_states[0])]


__all__ = ["VLMambaStateCache", "VLMambaStateLayer"]

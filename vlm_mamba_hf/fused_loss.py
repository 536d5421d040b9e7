"""Causal-LM loss with the vocabulary projection fused in, for training.

The usual path projects every position to the vocabulary, keeps the (b, l, vocab) fp32 logits for the
backward pass, then runs log-softmax and its backward over them. At a 50k vocabulary and 4k tokens that is
0.8 GB of logits and several full passes over them, about as much time as a small Mamba backbone. Here:

  - only positions with a target (label != -100 after the shift) are projected: prompts, image tokens and
    padding cost nothing;
  - rows are projected a chunk at a time, and each chunk's gradient (softmax - one-hot) is formed in place
    right after its loss and multiplied back at once, so the logits never exist in full and are never saved;
  - the backward pass only scales the gradients computed in the forward pass.

The loss is the sum of the token losses; callers divide by the number of targets (or Trainer's
`num_items_in_batch`), which gives transformers' `ForCausalLMLoss` exactly.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# fp32 logits per chunk (rows x vocab): 16 MB, so that a chunk's passes stay close to the cache.
_CHUNK_ELEMENTS = 1 << 22


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, target_i); gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        hidden_w = hidden.to(weight.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden_w) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
        for start in range(0, rows, step):
            h = hidden_w[start : start + step]
            t = targets[start : start + step]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if not need_grad:
                continue
            # d(loss_i)/d(logits_i) = softmax(logits_i) - onehot(target_i), formed in place.
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits = probs.to(weight.dtype)
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[start : start + step])
            if grad_weight is not None:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:
                    grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        out_hidden = None if grad_hidden is None else (grad_hidden * grad_total).to(hidden_dtype)
        out_weight = None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype)
        return out_hidden, out_weight, None


def fused_causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Shifted causal-LM cross-entropy of `hidden_states @ weight^T` against `labels`, without the logits.

    hidden_states (b, l, d), weight (vocab, d), labels (b, l) with `ignore_index` where nothing is predicted.
    Reduction as transformers' `ForCausalLMLoss`: the sum divided by `num_items_in_batch` when given (gradient
    accumulation), else the mean over the targets (NaN when there is none, as there).
    """
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the sequence shape {tuple(hidden_states.shape[:2])}."
        )
    targets = labels[:, 1:].reshape(-1).to(device=hidden_states.device, dtype=torch.long)
    keep = targets != ignore_index
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])[keep]
    targets = targets[keep]
    vocab = weight.shape[0]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"labels must be token ids in [0, {vocab}) or {ignore_index} (ignored); got values from "
            f"{int(targets.min())} to {int(targets.max())}."
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # As autocast runs lm_head: the projection in the autocast dtype, the loss in fp32.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        total = _LinearCrossEntropySum.apply(hidden, weight, targets)
    if num_items_in_batch is None:
        return total / targets.numel() if targets.numel() else total * float("nan")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


__all__ = ["IGNORE_INDEX", "fused_causal_lm_loss"]

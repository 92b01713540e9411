"""Next-token cross-entropy from the hidden states and the LM head, chunk by chunk.

``linear_cross_entropy(x, weight, targets)`` equals
``F.cross_entropy((x @ weight.T).float(), targets)`` in value and gradients, but holds the
fp32 logits of one chunk of tokens at a time, never ``[tokens, vocab]`` whole: at
``B = 4, T = 2048`` and 32,000 tokens those would be 1 GiB, with as much again for their
gradient. The forward pass keeps each token's log-sum-exp (``[tokens]`` fp32); the
backward pass recomputes each chunk's logits from ``x`` and ``weight``, turns them into
the softmax's gradient in place, and multiplies it into both inputs' gradients.

Under autocast the logits are computed in the autocast dtype and the softmax in fp32,
as the reference (``head(x).float()``) does; outside it in the inputs' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "chunk_tokens", "linear_cross_entropy"]

IGNORE_INDEX = -100  # as F.cross_entropy: targets with this value add nothing to the loss
# fp32 logits held at a time (elements): 64 MiB, 512 tokens of a 32K vocabulary
LOGITS_BUDGET = 1 << 24


def chunk_tokens(vocab_size: int, budget: int = LOGITS_BUDGET) -> int:
    """Tokens a chunk, such that its fp32 logits hold about ``budget`` elements."""
    return max(1, budget // vocab_size)


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over the valid tokens of ``logsumexp(logits) - logits[target]``, and its
    gradients, with the logits made chunk by chunk (``x [N, d]``, ``weight [V, d]``,
    ``targets [N]``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int,
                dtype: torch.dtype) -> Tensor:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        acc = torch.promote_types(dtype, torch.float32)  # the softmax's dtype: fp32, or fp64 for fp64
        lse = torch.empty(x.shape[0], dtype=acc, device=x.device)
        picked = torch.empty_like(lse)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, x.shape[0], chunk):
                logits = (x[s : s + chunk].to(dtype) @ w.T).to(acc)  # [c, V]
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                picked[s : s + chunk] = logits.gather(1, safe[s : s + chunk, None]).squeeze(1)
        ctx.save_for_backward(x, weight, safe, valid, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return torch.where(valid, lse - picked, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, safe, valid, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        scale = valid.to(lse.dtype) * grad.to(lse.dtype)  # [N]: 0 for ignored tokens
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, x.shape[0], chunk):
                xc = x[s : s + chunk].to(dtype)
                g = (xc @ w.T).to(lse.dtype)  # [c, V] logits, then d loss / d logits in place
                g.sub_(lse[s : s + chunk, None]).exp_()  # softmax
                g.scatter_add_(1, safe[s : s + chunk, None], torch.full_like(g[:, :1], -1.0))
                g.mul_(scale[s : s + chunk, None])
                g = g.to(dtype)
                if need_x:
                    grad_x[s : s + chunk] = g @ w
                if need_w and grad_w.dtype == dtype:
                    grad_w.addmm_(g.T, xc)
                elif need_w:  # a bf16 product, summed in fp32
                    grad_w += g.T @ xc
        return grad_x, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         reduction: str = "mean", chunk: int | None = None) -> Tensor:
    """Cross-entropy of the logits ``x @ weight.T`` against ``targets``, without making
    the logits whole. ``x``: ``[..., d]``; ``weight``: ``[V, d]``; ``targets``: ``[...]``.
    ``reduction``: ``mean`` over the tokens not ``ignore_index`` (nan when there are
    none, as ``F.cross_entropy``) or ``sum``; ``chunk`` tokens at a time (default: about
    64 MiB of fp32 logits)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"x has {tuple(x.shape[:-1])} tokens, targets {tuple(targets.shape)}")
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    total = LinearCrossEntropy.apply(x, weight, targets, ignore_index, chunk or chunk_tokens(weight.shape[0]), dtype)
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()

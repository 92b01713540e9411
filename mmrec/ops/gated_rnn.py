"""The seeds' nonlinear recurrence ``h_t = z_t ⊙ σ(W_g h_{t-1}) + γ_t ⊙ h_{t-1}``.

``W_g`` is block-diagonal, one ``[head_dim, head_dim]`` block per head. The state sits
inside the gate, so this cannot be a scan: it runs step by step. This is the reference
loop; a fused on-chip kernel is planned as the op ``mmrec::gated_rnn``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def gated_rnn_reference(z: Tensor, log_decay: Tensor, weight: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``z``, ``log_decay``: ``[B, T, H*E]``; ``weight``: ``[H, E, E]``; ``h0``: ``[B, H*E]``.

    Returns ``(h [B, T, H*E], h_last [B, H*E])`` in the dtype of ``log_decay``.
    """
    n_heads, head_dim, _ = weight.shape
    acc = log_decay.dtype
    z = rearrange(z.to(acc), "b t (h e) -> b t h e", h=n_heads)
    decay = rearrange(log_decay.exp(), "b t (h e) -> b t h e", h=n_heads)
    weight = weight.to(acc)
    h = z.new_zeros(z.shape[0], n_heads, head_dim) if h0 is None else rearrange(h0.to(acc), "b (h e) -> b h e", h=n_heads)
    states = []
    for t in range(z.shape[1]):
        gate = torch.sigmoid(torch.einsum("bhi,hij->bhj", h, weight))
        h = z[:, t] * gate + decay[:, t] * h
        states.append(h)
    out = torch.stack(states, dim=1)
    return rearrange(out, "b t h e -> b t (h e)"), rearrange(h, "b h e -> b (h e)")

"""Memory attention: each token's query attends over a fixed set of memory slots.

Cost is O(slots) per token, never O(T). Memory banks act as key/value groups: the
``n_heads`` query heads are split evenly over the ``banks`` (as in grouped-query
attention), and each bank's slots are projected to keys and values per bank.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class MemoryAttention(nn.Module):
    def __init__(self, n_heads: int, head_dim: int, banks: int, slot_dim: int, init_std: float = 0.02):
        super().__init__()
        if n_heads % banks:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by the memory banks ({banks})")
        self.n_heads, self.banks = n_heads, banks
        self.key = nn.Parameter(torch.empty(banks, slot_dim, head_dim))
        self.value = nn.Parameter(torch.empty(banks, slot_dim, head_dim))
        self.init_std = init_std
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.key, std=self.init_std)
        nn.init.normal_(self.value, std=self.init_std)

    def forward(self, q: Tensor, slots: Tensor, dropout: float = 0.0) -> Tensor:
        """``q``: ``[N, L, n_heads * head_dim]`` queries; ``slots``: ``[N, banks, S, slot_dim]``.

        Returns ``[N, L, n_heads * head_dim]``; N is any batch (e.g. batch x chunks).
        """
        slots = slots.to(q.dtype)
        keys = torch.einsum("nbsd,bde->nbse", slots, self.key.to(q.dtype))
        values = torch.einsum("nbsd,bde->nbse", slots, self.value.to(q.dtype))
        groups = self.n_heads // self.banks
        keys = keys.repeat_interleave(groups, dim=1)  # [N, n_heads, S, head_dim]
        values = values.repeat_interleave(groups, dim=1)
        queries = rearrange(q, "n l (h e) -> n h l e", h=self.n_heads)
        out = nn.functional.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout)
        return rearrange(out, "n h l e -> n l (h e)")

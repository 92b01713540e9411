"""Memory attention: each token's query attends over a fixed set of memory slots.

Cost is O(slots) per token, never O(T). Memory banks act as key/value groups: the
``n_heads`` query heads are split evenly over the ``banks`` (as in grouped-query
attention), and each bank's slots are projected to keys and values per bank.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


def sdpa_ready(x: Tensor) -> Tensor:
    """``x``, or a contiguous copy if a row stride is not a multiple of 16 bytes, which the
    fused CUDA attention kernels require of their operands. Views of a fused projection
    whose total width is not a multiple of 8 (e.g. with a per-head output of 1 or 2 heads)
    are such; a copy costs far less than the attention."""
    if any(stride * x.element_size() % 16 for stride in x.stride()[:-1]):
        return x.contiguous()
    return x


class MemoryAttention(nn.Module):
    def __init__(self, n_heads: int, head_dim: int, banks: int, slot_dim: int, init_std: float = 0.02):
        super().__init__()
        if n_heads % banks:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by the memory banks ({banks})")
        self.n_heads, self.banks, self.head_dim = n_heads, banks, head_dim
        self.key = nn.Parameter(torch.empty(banks, slot_dim, head_dim))
        self.value = nn.Parameter(torch.empty(banks, slot_dim, head_dim))
        self.init_std = init_std
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.key, std=self.init_std)
        nn.init.normal_(self.value, std=self.init_std)

    def project(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[banks, N, head_dim]`` of ``slots`` ``[banks, N, slot_dim]``."""
        weights = torch.cat([self.key, self.value], dim=-1).to(slots.dtype)  # one matmul for both
        return torch.bmm(slots, weights).chunk(2, dim=-1)

    def head_values(self, v: Tensor) -> Tensor:
        """``v`` ``[..., banks * slot_dim]`` projected by each bank's value weight, then
        given to that bank's query heads as ``attend`` groups them: ``[..., n_heads * head_dim]``."""
        values = torch.einsum("...md,mde->...me", v.unflatten(-1, (self.banks, -1)), self.value.to(v.dtype))
        return values.repeat_interleave(self.n_heads // self.banks, dim=-2).flatten(-2)

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, dropout: float = 0.0) -> Tensor:
        """``q``: ``[N, L, n_heads * head_dim]``; ``keys``, ``values``: ``[N, banks, S, head_dim]``.

        The banks are shared by their groups of query heads inside the attention
        (``enable_gqa``), never repeated in memory. Returns ``[N, L, n_heads * head_dim]``.
        """
        queries = sdpa_ready(rearrange(q, "n l (h e) -> n h l e", h=self.n_heads))
        out = nn.functional.scaled_dot_product_attention(
            queries, keys, values, dropout_p=dropout, enable_gqa=self.n_heads != self.banks
        )
        return rearrange(out, "n h l e -> n l (h e)")

    def forward(self, q: Tensor, slots: Tensor, dropout: float = 0.0) -> Tensor:
        """``q``: ``[N, L, n_heads * head_dim]`` queries; ``slots``: ``[N, banks, S, slot_dim]``.

        Returns ``[N, L, n_heads * head_dim]``; N is any batch (e.g. batch x chunks).
        """
        n, banks, s, _ = slots.shape
        keys, values = self.project(slots.to(q.dtype).transpose(0, 1).reshape(banks, n * s, -1))
        keys, values = (rearrange(x, "m (n s) e -> n m s e", n=n) for x in (keys, values))
        return self.attend(q, keys, values, dropout)

"""Causal multi-head self-attention with rotary positions, through SDPA.

The layer a Transformer baseline is built from: O(T^2) in time, O(T) KV memory.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


def rotary(x: Tensor, base: float, offset: int = 0) -> Tensor:
    """Rotate pairs of channels of ``[B, H, T, E]`` by angles of positions ``offset + t`` (RoPE)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    positions = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)
    angles = positions[:, None] * freqs  # [T, E/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.rope_base, self.dropout = n_heads, rope_base, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None, position: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """``x``: ``[B, T, d]``; ``cache``: key and value buffers ``[B, H, capacity, E]`` whose
        first ``position`` entries hold the earlier tokens.

        Returns the output and the cache holding these tokens too. A cache with room is
        written in place; a full one is reallocated at twice its capacity, so a decode
        step costs O(1) copies amortised, as with a preallocated KV cache.
        """
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3, h=self.n_heads)
        seen = position if cache is not None else 0
        q, k = rotary(q, self.rope_base, seen), rotary(k, self.rope_base, seen)
        if cache is None:
            cache = {"k": k, "v": v}
        else:
            cache = {name: self._room(cache[name], seen, seen + k.shape[2]) for name in ("k", "v")}
            cache["k"][:, :, seen : seen + k.shape[2]] = k
            cache["v"][:, :, seen : seen + v.shape[2]] = v
            k, v = cache["k"][:, :, : seen + k.shape[2]], cache["v"][:, :, : seen + v.shape[2]]
        dropout = self.dropout if self.training else 0.0
        if seen == 0 or q.shape[2] == 1:  # plain causal, or one new token that sees everything
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=seen == 0, dropout_p=dropout)
        else:  # new tokens see the whole cache and each other causally
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(seen)
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(rearrange(y, "b h t e -> b t (h e)")), cache

    @staticmethod
    def _room(buffer: Tensor, used: int, needed: int) -> Tensor:
        if buffer.shape[2] >= needed:
            return buffer
        grown = buffer.new_empty(*buffer.shape[:2], max(needed, 2 * buffer.shape[2]), buffer.shape[3])
        grown[:, :, :used] = buffer[:, :, :used]
        return grown

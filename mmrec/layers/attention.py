"""Causal multi-head self-attention with rotary positions, through SDPA.

The layer a Transformer baseline is built from: O(T^2) in time, O(T) KV memory.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


def rotary(x: Tensor, base: float) -> Tensor:
    """Rotate pairs of channels of ``[B, H, T, E]`` by position-dependent angles (RoPE)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * freqs  # [T, E/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.rope_base, self.dropout = n_heads, rope_base, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3, h=self.n_heads)
        q, k = rotary(q, self.rope_base), rotary(k, self.rope_base)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h t e -> b t (h e)"))

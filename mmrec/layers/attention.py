"""Causal multi-head self-attention with rotary positions, through SDPA.

The layer a Transformer baseline is built from: O(T^2) in time, O(T) KV memory.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from mmrec.ops import accumulation_dtype


def rotary(x: Tensor, base: float, offset: int | Tensor = 0) -> Tensor:
    """Rotate pairs of channels of ``[..., T, E]`` by angles of positions ``offset + t`` (RoPE),
    in the accumulation dtype (float32; float64 for float64 inputs, so that float64 tests
    are exact). ``offset`` may be a 0-dim tensor (static decoding: no host synchronisation)."""
    half, acc = x.shape[-1] // 2, accumulation_dtype(x.dtype)
    freqs = base ** (-torch.arange(half, device=x.device, dtype=acc) / half)
    positions = torch.arange(x.shape[-2], device=x.device, dtype=acc) + offset
    angles = positions[:, None] * freqs  # [T, E/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.rope_base, self.dropout = n_heads, rope_base, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None, position: int | Tensor = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """``x``: ``[B, T, d]``; ``cache``: key and value buffers ``[B, H, capacity, E]`` whose
        first ``position`` entries hold the earlier tokens.

        Returns the output and the cache holding these tokens too. A cache with room is
        written in place; a full one is reallocated at twice its capacity, so a decode
        step costs O(1) copies amortised, as with a preallocated KV cache.

        A ``position`` tensor (0-dim int64) marks a static decode step (``mmrec.decode``):
        one token, a cache from :func:`static_cache`, written in place at ``position``, and
        attention over the whole capacity with the entries past ``position`` masked (as
        gpt-fast does), so that shapes never change and nothing waits for the host.
        """
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3, h=self.n_heads)
        if isinstance(position, Tensor):
            return self._static_step(q, k, v, cache, position), cache
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

    def _static_step(self, q: Tensor, k: Tensor, v: Tensor, cache: dict, position: Tensor) -> Tensor:
        q, k = rotary(q, self.rope_base, position), rotary(k, self.rope_base, position)
        cache["k"].index_copy_(2, position.view(1), k.to(cache["k"].dtype))
        cache["v"].index_copy_(2, position.view(1), v.to(cache["v"].dtype))
        visible = torch.arange(cache["k"].shape[2], device=q.device) <= position  # [capacity]
        if cache.get("splits", 0):
            y = split_kv_attention(q, cache["k"], cache["v"], visible, cache["splits"])
        else:
            y = nn.functional.scaled_dot_product_attention(q, cache["k"], cache["v"], attn_mask=visible[None, :])
        return self.out(rearrange(y, "b h t e -> b t (h e)"))

    @staticmethod
    def _room(buffer: Tensor, used: int, needed: int) -> Tensor:
        if buffer.shape[2] >= needed:
            return buffer
        grown = buffer.new_empty(*buffer.shape[:2], max(needed, 2 * buffer.shape[2]), buffer.shape[3])
        grown[:, :, :used] = buffer[:, :, :used]
        return grown


def static_cache(cache: dict[str, Tensor], position: int, capacity: int, splits: int = 0, donate: bool = False) -> dict:
    """A preallocated KV cache of ``capacity`` entries (zeros past ``position``: masked keys
    must not hold NaNs) holding the first ``position`` entries of ``cache``. ``splits > 0``
    makes static steps attend by :func:`split_kv_attention` instead of SDPA. ``donate``:
    ``cache``'s own tensors are used (zeroed past ``position``) when they hold at least
    ``capacity`` entries."""
    k = cache["k"]
    if donate and k.shape[2] >= capacity and not (splits and k.shape[2] % splits) and cache["v"].shape == k.shape:
        for name in ("k", "v"):
            cache[name][:, :, position:].zero_()
        return {"k": cache["k"], "v": cache["v"], "splits": splits}
    if splits and capacity % splits:
        raise ValueError(f"capacity {capacity} must be divisible by splits {splits}")
    static = {name: k.new_zeros(*k.shape[:2], capacity, k.shape[3]) for name in ("k", "v")}
    for name in ("k", "v"):
        static[name][:, :, :position] = cache[name][:, :, :position]
    static["splits"] = splits
    return static


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, splits: int) -> Tensor:
    """Attention of ``q`` ``[B, H, 1, E]`` over ``k``, ``v`` ``[B, H, S, E]`` where ``visible``
    ``[S]``, as matmuls: the weighted sum over the keys is cut into ``splits`` blocks
    reduced in parallel (flash-decoding's split, without a fused kernel), so that a long
    cache is read by the whole GPU even at batch 1."""
    batch, heads, length, dim = k.shape
    acc = accumulation_dtype(v.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * dim**-0.5  # [B, H, 1, S]
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(v.dtype)
    block = length // splits
    parts = torch.matmul(weights.view(batch, heads, splits, 1, block), v.view(batch, heads, splits, block, dim))
    return parts.to(acc).sum(2).to(v.dtype)  # [B, H, 1, E]

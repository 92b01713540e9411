"""Causal multi-head self-attention with rotary positions, through SDPA.

The layer a Transformer baseline is built from: O(T^2) in time, O(T) KV memory.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from mmrec.documents import document_ids
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

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None, position: int | Tensor = 0,
                resets: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``x``: ``[B, T, d]``; ``cache``: key and value buffers ``[B, H, capacity, E]`` whose
        first ``position`` entries hold the earlier tokens.

        Returns the output and the cache holding these tokens too. A cache with room is
        written in place; a full one is reallocated at twice its capacity, so a decode
        step costs O(1) copies amortised, as with a preallocated KV cache.

        ``resets`` ``[B, T]`` bool marks document starts (:mod:`mmrec.documents`): a token then
        attends only to earlier tokens of its own document. The cache keeps each entry's
        document id (``doc`` ``[B, capacity]`` int64, counting on across calls), so pieces
        equal one pass; a later call without resets continues the last document.

        A ``position`` tensor (0-dim int64) marks a static decode step (``mmrec.decode``):
        one token, a cache from :func:`static_cache`, written in place at ``position``, and
        attention over the whole capacity with the entries past ``position`` masked (as
        gpt-fast does), so that shapes never change and nothing waits for the host.
        """
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3, h=self.n_heads)
        if isinstance(position, Tensor):
            if resets is not None:
                raise ValueError("a static decode step (position tensor) takes no resets: feed a document start "
                                 "through an eager call (int position)")
            return self._static_step(q, k, v, cache, position), cache
        seen = position if cache is not None else 0
        new = seen + k.shape[2]
        q, k = rotary(q, self.rope_base, seen), rotary(k, self.rope_base, seen)
        doc = None  # [B, T]: the new tokens' document ids, when documents are tracked
        if resets is not None or (cache is not None and "doc" in cache):
            if resets is not None and resets.shape != x.shape[:2]:
                raise ValueError(f"resets has shape {tuple(resets.shape)}; it must be [B, T] = {tuple(x.shape[:2])}, one flag per token")
            if cache is not None and "doc" not in cache:  # the cached tokens: one document, id 0
                cache = {**cache, "doc": torch.zeros(x.shape[0], cache["k"].shape[2], dtype=torch.long, device=x.device)}
            last = cache["doc"][:, seen - 1 : seen] if seen else x.new_zeros(x.shape[0], 1, dtype=torch.long)  # [B, 1]
            doc = (last + (document_ids(resets) if resets is not None else 0)).expand(x.shape[0], k.shape[2])
        if cache is None:
            cache = {"k": k, "v": v} if doc is None else {"k": k, "v": v, "doc": doc}
        else:
            names = ("k", "v") if doc is None else ("k", "v", "doc")
            cache = {name: self._room(cache[name], seen, new, dim=1 if name == "doc" else 2) for name in names}
            cache["k"][:, :, seen:new], cache["v"][:, :, seen:new] = k, v
            k, v = cache["k"][:, :, :new], cache["v"][:, :, :new]
            if doc is not None:
                cache["doc"][:, seen:new] = doc
        dropout = self.dropout if self.training else 0.0
        if doc is None and (seen == 0 or q.shape[2] == 1):  # plain causal, or one new token that sees everything
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=seen == 0, dropout_p=dropout)
        else:  # new tokens see the cache and each other causally (and only their own document)
            mask = torch.ones(q.shape[2], new, dtype=torch.bool, device=q.device).tril(seen)  # [T, seen + T]
            if doc is not None:
                mask = (mask & (doc[:, :, None] == cache["doc"][:, None, :new]))[:, None]  # [B, 1, T, seen + T]
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(rearrange(y, "b h t e -> b t (h e)")), cache

    def _static_step(self, q: Tensor, k: Tensor, v: Tensor, cache: dict, position: Tensor) -> Tensor:
        q, k = rotary(q, self.rope_base, position), rotary(k, self.rope_base, position)
        cache["k"].index_copy_(2, position.view(1), k.to(cache["k"].dtype))
        cache["v"].index_copy_(2, position.view(1), v.to(cache["v"].dtype))
        visible = (torch.arange(cache["k"].shape[2], device=q.device) <= position)[None]  # [1, capacity]
        if "doc" in cache:  # the step continues the last document
            last = cache["doc"].index_select(1, (position - 1).clamp(min=0).view(1))  # [B, 1]
            cache["doc"].index_copy_(1, position.view(1), last)
            visible = (visible & (cache["doc"] == last))[:, None, None]  # [B, 1, 1, capacity]
        if cache.get("splits", 0):
            y = split_kv_attention(q, cache["k"], cache["v"], visible, cache["splits"])
        else:
            y = nn.functional.scaled_dot_product_attention(q, cache["k"], cache["v"], attn_mask=visible)
        return self.out(rearrange(y, "b h t e -> b t (h e)"))

    @staticmethod
    def _room(buffer: Tensor, used: int, needed: int, dim: int = 2) -> Tensor:
        """``buffer``, or a copy of its first ``used`` entries along ``dim`` with room for ``needed``."""
        if buffer.shape[dim] >= needed:
            return buffer
        shape = list(buffer.shape)
        shape[dim] = max(needed, 2 * buffer.shape[dim])
        grown = buffer.new_empty(shape)
        grown.narrow(dim, 0, used).copy_(buffer.narrow(dim, 0, used))
        return grown


def static_cache(cache: dict[str, Tensor], position: int, capacity: int, splits: int = 0, donate: bool = False) -> dict:
    """A preallocated KV cache of ``capacity`` entries (zeros past ``position``: masked keys
    must not hold NaNs) holding the first ``position`` entries of ``cache``. ``splits > 0``
    makes static steps attend by :func:`split_kv_attention` instead of SDPA. ``donate``:
    ``cache``'s own tensors are used (zeroed past ``position``) when they hold at least
    ``capacity`` entries. A cache with document ids (``doc``) keeps them, so the steps
    continue its last document."""
    k = cache["k"]
    if donate and k.shape[2] >= capacity and not (splits and k.shape[2] % splits) and cache["v"].shape == k.shape:
        for name in ("k", "v"):
            cache[name][:, :, position:].zero_()
        static = {"k": cache["k"], "v": cache["v"], "splits": splits}
    else:
        if splits and capacity % splits:
            raise ValueError(f"capacity {capacity} must be divisible by splits {splits}")
        static = {name: k.new_zeros(*k.shape[:2], capacity, k.shape[3]) for name in ("k", "v")}
        for name in ("k", "v"):
            static[name][:, :, :position] = cache[name][:, :, :position]
        static["splits"] = splits
    if "doc" in cache:  # [B, capacity], as the keys
        static["doc"] = cache["doc"].new_zeros(k.shape[0], static["k"].shape[2])
        static["doc"][:, :position] = cache["doc"][:, :position]
    return static


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, splits: int) -> Tensor:
    """Attention of ``q`` ``[B, H, 1, E]`` over ``k``, ``v`` ``[B, H, S, E]`` where ``visible``
    (``[S]``, or ``[B, 1, 1, S]`` per sequence), as matmuls: the weighted sum over the keys
    is cut into ``splits`` blocks reduced in parallel (flash-decoding's split, without a
    fused kernel), so that a long cache is read by the whole GPU even at batch 1."""
    batch, heads, length, dim = k.shape
    acc = accumulation_dtype(v.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * dim**-0.5  # [B, H, 1, S]
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(v.dtype)
    block = length // splits
    parts = torch.matmul(weights.view(batch, heads, splits, 1, block), v.view(batch, heads, splits, block, dim))
    return parts.to(acc).sum(2).to(v.dtype)  # [B, H, 1, E]

"""The ``window`` memory: exact causal softmax attention over the current and previous chunk.

A token of chunk ``c`` attends to every token of chunk ``c - 1`` and to the tokens of
chunk ``c`` up to itself (``C``, the block's ``chunk_size``, is the window unit, so a token
sees between ``C`` and ``2C - 1`` earlier tokens). Recall within that span is then
attention's own, while the cost stays O(T·2C) and the state is at most the previous
chunk's and the current chunk's keys and values, whatever the length.

The block's ``q`` is split into ``n_heads`` heads of ``d_model / n_heads``; ``k`` and ``v``
into ``kv_heads`` heads of the same width (grouped-query attention with fewer). The
context is the heads' outputs side by side, ``[B, T, d_model]``: the block's ``W_o`` is the
output projection, as for ``hds``.

RoPE positions are counted within the window: the previous chunk's tokens sit at
``0 .. C-1``, the current chunk's at ``C .. 2C-1``. Scores depend only on position
differences, so this is RoPE with absolute positions, exactly; but a token's rotation
depends only on its index in its chunk, so a sequence fed in pieces rotates every query
and key as one pass does without carrying a position, and angles stay small at any length.

Training (``forward``) cuts the sequence into chunks and lets each chunk's queries attend
over ``[previous chunk, own chunk]`` in one ``scaled_dot_product_attention`` call with a
``[chunks, C, 2C]`` boolean mask: a fused kernel (memory-efficient attention on CUDA)
that compiles without graph breaks, where ``flex_attention`` would need compilation even
to be efficient and ``CausalBias`` cannot be built inside a compiled region.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from torch import Tensor, nn

from mmrec.contracts import ChunkedMemory
from mmrec.layers.attention import rotary


class WindowMemory(ChunkedMemory):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["window"] = "window"
        kv_heads: PositiveInt | None = Field(None, description="key/value heads (grouped-query attention); null: n_heads")
        rope_base: PositiveFloat = Field(10000.0, description="RoPE base of the window's positions")

        def check_model(self, model) -> None:
            """Key/value heads share the query heads evenly; RoPE rotates pairs of channels."""
            if self.kv_heads is not None and model.n_heads % self.kv_heads:
                raise ValueError(f"memory.kv_heads ({self.kv_heads}) must divide n_heads ({model.n_heads})")
            if (model.d_model // model.n_heads) % 2:
                raise ValueError(f"the window memory's RoPE needs an even head width, got {model.d_model // model.n_heads}")

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.d_model = d_model
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.kv_heads = config.kv_heads or n_heads
        self.rope_base = config.rope_base
        self.key_dim = self.kv_heads * self.head_dim  # width of the k and v the block projects

    def flops_per_token(self, length: int, chunk_size: int) -> float:
        """q·k and p·v over the window, forward and backward: a token attends to the
        previous chunk and its own chunk up to itself, about 1.5 chunks on average."""
        return 12 * 1.5 * min(chunk_size, length) * self.d_model

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        """``[B, T, heads*E]`` -> ``[B, heads, T, E]``."""
        return rearrange(x, "b t (h e) -> b h t e", h=heads)

    def _expand_kv(self, x: Tensor) -> Tensor:
        """``[B, kv_heads, ...]`` -> ``[B, n_heads, ...]``, each key/value head shared by its
        group of query heads. Repeated rather than passed to SDPA as ``enable_gqa``, which
        with a mask not every fused kernel takes: the repeat keeps them all eligible."""
        groups = self.n_heads // self.kv_heads
        return x if groups == 1 else x.repeat_interleave(groups, dim=1)

    def initial_memory(self, batch: int, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Tensor]:
        """No previous chunk."""
        empty = torch.zeros(batch, 0, self.key_dim, dtype=dtype, device=device)
        return {"prev_k": empty, "prev_v": empty}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, memory: dict[str, Tensor], chunk_size: int, pending: int,
               dropout: float) -> tuple[Tensor, dict[str, Tensor]]:
        """``q``: ``[B, T, d_model]``; ``k``, ``v``: ``[B, pending + T, key_dim]``, the current
        chunk from its first token on; ``memory``: the previous complete chunk's keys and
        values (``prev_k``, ``prev_v``: ``[B, C, key_dim]``, or ``[B, 0, key_dim]`` before the
        first chunk completes), unrotated. Returns the context ``[B, T, d_model]`` and the
        previous chunk after these tokens."""
        prev_k, prev_v = memory["prev_k"].to(k.dtype), memory["prev_v"].to(v.dtype)
        total = pending + q.shape[1]
        if total <= chunk_size:
            context = self._within_one_chunk(q, k, v, prev_k, prev_v, chunk_size, pending, dropout)
        else:
            context = self._chunked(q, k, v, prev_k, prev_v, chunk_size, pending, dropout)
        n_full = total // chunk_size
        if not n_full:
            return context, memory
        # copies (one chunk): views would keep the whole projection alive
        last = slice((n_full - 1) * chunk_size, n_full * chunk_size)
        return context, {"prev_k": k[:, last].clone(), "prev_v": v[:, last].clone()}

    def _within_one_chunk(self, q, k, v, prev_k, prev_v, chunk_size, pending, dropout) -> Tensor:
        """All new tokens in one chunk (e.g. eager decoding), with no padded queries: ``q``
        ``[B, T, d]`` over the previous chunk (``P`` = 0 or C tokens) and the chunk so far
        ``k``, ``v`` ``[B, pending + T, key_dim]``."""
        base, length = self.rope_base, q.shape[1]
        queries = rotary(self._heads(q, self.n_heads), base, chunk_size + pending)  # [B, H, T, E]
        keys = torch.cat([rotary(self._heads(prev_k, self.kv_heads), base, 0),
                          rotary(self._heads(k, self.kv_heads), base, chunk_size)], dim=2)  # [B, kv, P + pending + T, E]
        values = torch.cat([self._heads(prev_v, self.kv_heads), self._heads(v, self.kv_heads)], dim=2)
        span = keys.shape[2]
        # query i sits at window index span - T + i and sees every key up to it
        mask = torch.ones(length, span, dtype=torch.bool, device=q.device).tril(span - length)
        out = nn.functional.scaled_dot_product_attention(
            queries, self._expand_kv(keys), self._expand_kv(values), attn_mask=mask, dropout_p=dropout)
        return rearrange(out, "b h t e -> b t (h e)")

    def _chunked(self, q, k, v, prev_k, prev_v, chunk_size, pending, dropout) -> Tensor:
        """New tokens over several chunks: queries padded to whole chunks (``pending`` in front,
        the rest behind), each chunk attending over ``[previous chunk, own chunk]``."""
        batch, base, c = q.shape[0], self.rope_base, chunk_size
        total = pending + q.shape[1]
        n = -(-total // c)
        if pending or total < n * c:  # padded keys follow every real query
            q = nn.functional.pad(q, (0, 0, pending, n * c - total))
            k, v = (nn.functional.pad(x, (0, 0, 0, n * c - total)) for x in (k, v))
        # chunk-major, so that one mask [n, C, 2C] broadcasts over batch and heads
        chunks = lambda x, h: rearrange(x, "b (n c) (h e) -> b h n c e", c=c, h=h)  # noqa: E731
        queries = rotary(chunks(q, self.n_heads), base, c)  # [B, H, n, C, E]
        own_k, own_v = chunks(k, self.kv_heads), chunks(v, self.kv_heads)  # [B, kv, n, C, E]
        # each chunk's predecessor; chunk 0's comes from the state, or is zeros its mask hides
        has_prev = prev_k.shape[1] > 0
        first_k, first_v = (
            (self._heads(prev_k, self.kv_heads)[:, :, None], self._heads(prev_v, self.kv_heads)[:, :, None])
            if has_prev else (torch.zeros_like(own_k[:, :, :1]), torch.zeros_like(own_v[:, :, :1]))
        )
        before_k = torch.cat([first_k, own_k[:, :, :-1]], dim=2)
        before_v = torch.cat([first_v, own_v[:, :, :-1]], dim=2)
        keys = torch.cat([rotary(before_k, base, 0), rotary(own_k, base, c)], dim=3)  # [B, kv, n, 2C, E]
        values = torch.cat([before_v, own_v], dim=3)
        i = torch.arange(c, device=q.device)[:, None]
        s = torch.arange(2 * c, device=q.device)
        before_visible = torch.arange(n, device=q.device)[:, None, None] >= (0 if has_prev else 1)
        mask = (s <= c + i) & ((s >= c) | before_visible)  # [n, C, 2C]: all of the predecessor, causal in own
        out = nn.functional.scaled_dot_product_attention(  # [B·H, n, C, E]
            queries.flatten(0, 1), self._expand_kv(keys).flatten(0, 1), self._expand_kv(values).flatten(0, 1),
            attn_mask=mask, dropout_p=dropout)
        out = rearrange(out, "(b h) n c e -> b (n c) (h e)", b=batch)
        return out[:, pending:total]

    # Static decoding (mmrec.decode): one token per step, fixed shapes, buffers updated in
    # place, so that the step can be captured in a CUDA graph. The previous chunk lives in
    # ``prev_k``, ``prev_v`` ``[B, C, key_dim]``, the chunk in progress in ChunkedMemory's
    # ``pending_k``, ``pending_v``; `complete_chunk` copies the second into the first. Keys
    # stay unrotated, as in the eager state, and a step rotates all 2C of them: as much work
    # as the attention itself, and no second copy of the window to keep in step.

    def static_memory(self, memory: dict[str, Tensor], batch: int, chunk_size: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """``prev_k``, ``prev_v`` ``[B, C, key_dim]`` (zeros where empty: masked entries must
        not hold NaNs) and ``has_prev``, a 0-dim bool: whether they hold a chunk."""
        prev = memory["prev_k"].shape[1]
        static = {}
        for name in ("prev_k", "prev_v"):
            static[name] = memory[name].new_zeros(batch, chunk_size, self.key_dim, dtype=dtype)
            static[name][:, :prev] = memory[name]
        static["has_prev"] = torch.tensor(prev > 0, device=static["prev_k"].device)
        return static

    def eager_memory(self, static: dict[str, Tensor]) -> dict[str, Tensor]:
        prev = static["prev_k"].shape[1] if bool(static["has_prev"]) else 0
        return {"prev_k": static["prev_k"][:, :prev].clone(), "prev_v": static["prev_v"][:, :prev].clone()}

    def read_step(self, q: Tensor, static: dict[str, Tensor], index: Tensor, chunk_size: int) -> Tensor:
        """``q`` ``[B, 1, d_model]`` over the previous chunk and its own chunk up to itself."""
        at = index + chunk_size  # the token's place in the window [previous chunk, own chunk]
        window_k = torch.cat([static["prev_k"], static["pending_k"]], dim=1)  # [B, 2C, key_dim]
        window_v = torch.cat([static["prev_v"], static["pending_v"]], dim=1)
        keys = rotary(self._heads(window_k, self.kv_heads), self.rope_base, 0)  # [B, kv, 2C, E]
        values = self._heads(window_v, self.kv_heads)
        query = rotary(self._heads(q, self.n_heads), self.rope_base, at)  # [B, H, 1, E]
        s = torch.arange(2 * chunk_size, device=q.device)
        visible = (s <= at) & ((s >= chunk_size) | static["has_prev"])  # [2C]
        out = nn.functional.scaled_dot_product_attention(
            query, self._expand_kv(keys), self._expand_kv(values), attn_mask=visible[None, :])
        return rearrange(out, "b h t e -> b t (h e)")

    def complete_chunk(self, static: dict[str, Tensor]) -> None:
        """The chunk in progress is complete: it becomes the previous chunk, in place."""
        static["prev_k"].copy_(static["pending_k"])
        static["prev_v"].copy_(static["pending_v"])
        static["has_prev"].fill_(True)

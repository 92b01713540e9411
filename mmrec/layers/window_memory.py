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

from mmrec.layers.attention import rotary


class WindowMemory(nn.Module):
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

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        """No previous chunk and no chunk in progress (on ``like``'s device, in its dtype)."""
        empty = like.new_zeros(like.shape[0], 0, self.key_dim)
        return {"prev_k": empty, "prev_v": empty, "pending_k": empty, "pending_v": empty}

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, state: dict[str, Tensor] | None = None, dropout: float = 0.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``q``: ``[B, T, d_model]``; ``k``, ``v``: ``[B, T, key_dim]``.

        ``state`` continues an earlier call: the previous complete chunk's keys and values
        (``prev_k``, ``prev_v``: ``[B, C, key_dim]``, or ``[B, 0, key_dim]`` before the first
        chunk completes) and those of the chunk in progress (``pending_k``, ``pending_v``,
        fewer than ``C`` tokens), all unrotated. Returns the context ``[B, T, d_model]`` and
        the state after these tokens.
        """
        state = self.initial_state(k) if state is None else state
        prev_k, prev_v = state["prev_k"].to(k.dtype), state["prev_v"].to(v.dtype)
        pending = state["pending_k"].shape[1]
        if pending:  # the current chunk from its first token on: [B, pending + T, key_dim]
            k = torch.cat([state["pending_k"].to(k.dtype), k], dim=1)
            v = torch.cat([state["pending_v"].to(v.dtype), v], dim=1)
        total = pending + q.shape[1]
        if total <= chunk_size:
            context = self._within_one_chunk(q, k, v, prev_k, prev_v, chunk_size, pending, dropout)
        else:
            context = self._chunked(q, k, v, prev_k, prev_v, chunk_size, pending, dropout)
        n_full = total // chunk_size
        if n_full:  # copies (one chunk at most): views would keep the whole projection alive
            prev_k = k[:, (n_full - 1) * chunk_size : n_full * chunk_size].clone()
            prev_v = v[:, (n_full - 1) * chunk_size : n_full * chunk_size].clone()
        else:
            prev_k, prev_v = state["prev_k"], state["prev_v"]
        rest = slice(n_full * chunk_size, None)
        return context, {"prev_k": prev_k, "prev_v": prev_v, "pending_k": k[:, rest].clone(), "pending_v": v[:, rest].clone()}

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
    # place, so that the step can be captured in a CUDA graph. The window lives in one
    # buffer per keys and values, [B, 2C, key_dim]: the previous chunk in [:C], the chunk in
    # progress in [C:]; `complete_chunk` moves the second half into the first. Keys stay
    # unrotated, as in the eager state, and a step rotates all 2C of them: as much work as
    # the attention itself, and no second copy of the window to keep in step.

    def static_state(self, state: dict[str, Tensor], batch: int, chunk_size: int,
                     dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Buffers for static decoding that continue the eager ``state`` (from a forward pass):
        ``window_k``, ``window_v`` ``[B, 2C, key_dim]`` (zeros where empty: masked entries must
        not hold NaNs) and ``has_prev``, a 0-dim bool: whether ``[:C]`` holds a chunk.
        ``dtype``: the activations' (default: that of the state's keys)."""
        dtype = dtype or state["pending_k"].dtype
        pending, prev = state["pending_k"].shape[1], state["prev_k"].shape[1]
        static = {}
        for name in ("k", "v"):
            window = state[f"pending_{name}"].new_zeros(batch, 2 * chunk_size, self.key_dim, dtype=dtype)
            window[:, :prev] = state[f"prev_{name}"]
            window[:, chunk_size : chunk_size + pending] = state[f"pending_{name}"]
            static[f"window_{name}"] = window
        static["has_prev"] = torch.tensor(prev > 0, device=static["window_k"].device)
        return static

    @staticmethod
    def eager_state(static: dict[str, Tensor], pending: int) -> dict[str, Tensor]:
        """The eager state equal to ``static`` with ``pending`` tokens in the chunk in progress."""
        c = static["window_k"].shape[1] // 2
        prev = c if bool(static["has_prev"]) else 0
        return {
            "prev_k": static["window_k"][:, :prev].clone(),
            "prev_v": static["window_v"][:, :prev].clone(),
            "pending_k": static["window_k"][:, c : c + pending].clone(),
            "pending_v": static["window_v"][:, c : c + pending].clone(),
        }

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, static: dict[str, Tensor], position: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One token: ``q`` ``[B, 1, d_model]``, ``k``, ``v`` ``[B, 1, key_dim]``; ``position``: the
        token's index in the sequence, a 0-dim int64 tensor. Records ``k``, ``v`` in ``static``
        in place, without host synchronisation; returns the context ``[B, 1, d_model]``. The
        step of a chunk's last token must be followed by :meth:`complete_chunk`."""
        index = position.remainder(chunk_size) + chunk_size  # the token's place in the window
        static["window_k"].index_copy_(1, index.view(1), k.to(static["window_k"].dtype))
        static["window_v"].index_copy_(1, index.view(1), v.to(static["window_v"].dtype))
        keys = rotary(self._heads(static["window_k"], self.kv_heads), self.rope_base, 0)  # [B, kv, 2C, E]
        values = self._heads(static["window_v"], self.kv_heads)
        query = rotary(self._heads(q, self.n_heads), self.rope_base, index)  # [B, H, 1, E]
        s = torch.arange(2 * chunk_size, device=q.device)
        visible = (s <= index) & ((s >= chunk_size) | static["has_prev"])  # [2C]
        out = nn.functional.scaled_dot_product_attention(
            query, self._expand_kv(keys), self._expand_kv(values), attn_mask=visible[None, :])
        return rearrange(out, "b h t e -> b t (h e)"), static

    def complete_chunk(self, static: dict[str, Tensor]) -> None:
        """The chunk in progress is complete: it becomes the previous chunk, in place."""
        c = static["window_k"].shape[1] // 2
        static["window_k"][:, :c].copy_(static["window_k"][:, c:])
        static["window_v"][:, :c].copy_(static["window_v"][:, c:])
        static["has_prev"].fill_(True)

"""The ``fifo`` memory: a queue of the last ``slots`` chunk summaries.

Where the built-in ``hds`` memory blends every chunk into learned slots, this one keeps
the most recent chunks verbatim in compressed form: each complete chunk of ``C`` tokens is
pooled (per bank, by a learned query attending over the chunk's keys and values) into
one summary, which enters a first-in-first-out queue of ``slots`` summaries. Tokens of
chunk ``c`` attend over the queue as it was before chunk ``c``: summaries of chunks
``c - slots .. c - 1`` (learned fillers before the sequence has that many).
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, repeat
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import Tensor, nn

from mmrec.layers.memory_attention import MemoryAttention
from mmrec.ops import accumulation_dtype

__all__ = ["FIFOMemory"]


class FIFOMemory(nn.Module):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["fifo"] = "fifo"
        slots: PositiveInt = Field(16, description="chunk summaries kept in the queue")
        banks: PositiveInt = Field(1, description="independent queues; the query heads are split over them")
        dim: PositiveInt = Field(32, description="width of one summary")

        def check_model(self, model) -> None:
            """The read splits the model's heads over the banks."""
            if model.n_heads % self.banks:
                raise ValueError(f"memory.banks ({self.banks}) must divide n_heads ({model.n_heads})")

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.slots, self.banks, self.dim = config.slots, config.banks, config.dim
        self.key_dim = config.banks * config.dim  # width of the k and v the block projects for us
        self.summary_query = nn.Parameter(torch.empty(config.banks, 1, config.dim))
        self.initial = nn.Parameter(torch.empty(config.banks, config.slots, config.dim))
        self.read = MemoryAttention(n_heads, d_model // n_heads, config.banks, config.dim, init_std)
        self.init_std = init_std
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.summary_query, std=1.0)
        nn.init.normal_(self.initial, std=self.init_std)

    def summarize(self, k: Tensor, v: Tensor) -> Tensor:
        """``[B, n, C, banks*dim]`` chunks -> one summary per chunk and bank ``[B, n, banks, dim]``."""
        batch = k.shape[0]
        keys = rearrange(k, "b n c (m d) -> (b n) m c d", m=self.banks)
        values = rearrange(v, "b n c (m d) -> (b n) m c d", m=self.banks)
        query = repeat(self.summary_query.to(k.dtype), "m one d -> bn m one d", bn=keys.shape[0])
        pooled = nn.functional.scaled_dot_product_attention(query, keys, values)
        return rearrange(pooled, "(b n) m 1 d -> b n m d", b=batch)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, state: dict | None = None, dropout: float = 0.0):
        """Same contract as the built-in memories: ``(context [B, T, d_model], next state)``."""
        batch, length, _ = q.shape
        if state is None:
            queue = self.initial.to(accumulation_dtype(k.dtype)).expand(batch, -1, -1, -1)
            pending_k, pending_v = k[:, :0], v[:, :0]
        else:
            queue, pending_k, pending_v = state["queue"], state["pending_k"], state["pending_v"]
        pending = pending_k.shape[1]
        k, v = torch.cat([pending_k.to(k.dtype), k], 1), torch.cat([pending_v.to(v.dtype), v], 1)
        total = pending + length
        n_full, n_read = total // chunk_size, -(-total // chunk_size)

        history = rearrange(queue, "b m s d -> b s m d")  # [B, slots, banks, dim], oldest first
        if n_full:
            chunked = lambda x: rearrange(x[:, : n_full * chunk_size], "b (n c) d -> b n c d", c=chunk_size)  # noqa: E731
            history = torch.cat([history, self.summarize(chunked(k), chunked(v)).to(history.dtype)], dim=1)
        # chunk c reads the `slots` summaries before it: a sliding window over the history
        windows = history.unfold(1, self.slots, 1)[:, :n_read]  # [B, n_read, banks, dim, slots]
        slots = rearrange(windows, "b n m d s -> (b n) m s d")

        queries = q if n_read == 1 else nn.functional.pad(q, (0, 0, pending, n_read * chunk_size - total))
        queries = rearrange(queries, "b (n c) d -> (b n) c d", n=n_read)
        context = rearrange(self.read(queries, slots, dropout), "(b n) c d -> b (n c) d", b=batch)
        if n_read > 1:
            context = context[:, pending:total]
        next_state = {  # copies: views would keep the whole history and keys/values alive
            "queue": rearrange(history[:, n_full : n_full + self.slots], "b s m d -> b m s d").clone(),
            "pending_k": k[:, n_full * chunk_size :].clone(),
            "pending_v": v[:, n_full * chunk_size :].clone(),
        }
        return context, next_state

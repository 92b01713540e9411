"""The ``fifo`` memory: a queue of the last ``slots`` chunk summaries.

Where the built-in ``hds`` memory blends every chunk into learned slots, this one keeps
the most recent chunks verbatim in compressed form: each complete chunk of ``C`` tokens is
pooled (per bank, by a learned query attending over the chunk's keys and values) into
one summary, which enters a first-in-first-out queue of ``slots`` summaries. Tokens of
chunk ``c`` attend over the queue as it was before chunk ``c``: summaries of chunks
``c - slots .. c - 1`` (learned fillers before the sequence has that many).

It builds on :class:`mmrec.contracts.ChunkedMemory`, which carries the chunk in progress
between calls: this module only writes complete chunks (``summarize``) and reads. It has
no static decode step, so ``mmrec.generate`` decodes it with eager steps.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, repeat
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import Tensor, nn

from mmrec.contracts import ChunkedMemory
from mmrec.layers.memory_attention import MemoryAttention
from mmrec.ops import accumulation_dtype

__all__ = ["FIFOMemory"]


class FIFOMemory(ChunkedMemory):
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

    def initial_memory(self, batch: int, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Tensor]:
        """The learned fillers: ``queue`` ``[B, banks, slots, dim]``, oldest first."""
        return {"queue": self.initial.to(device=device, dtype=accumulation_dtype(dtype)).expand(batch, -1, -1, -1)}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, memory: dict, chunk_size: int, pending: int, dropout: float):
        """Tokens of chunk ``c`` read the queue before it; each complete chunk pushes its summary.
        (``ChunkedMemory`` carries the chunk in progress and hands ``k``, ``v`` from its start.)"""
        batch, length, _ = q.shape
        history = rearrange(memory["queue"], "b m s d -> b s m d")  # [B, slots, banks, dim], oldest first
        n_full = (pending + length) // chunk_size
        if n_full:
            summaries = self.summarize(self.complete_chunks(k, chunk_size), self.complete_chunks(v, chunk_size))
            history = torch.cat([history, summaries.to(history.dtype)], dim=1)
        queries = self.chunked_queries(q, pending, chunk_size)  # [B, n_read, C, d]
        n_read = queries.shape[1]
        # chunk c reads the `slots` summaries before it: a sliding window over the history
        windows = history.unfold(1, self.slots, 1)[:, :n_read]  # [B, n_read, banks, dim, slots]
        slots = rearrange(windows, "b n m d s -> (b n) m s d")
        context = self.read(queries.flatten(0, 1), slots, dropout).unflatten(0, (batch, n_read))
        # a copy: a view would keep the whole history alive
        queue = rearrange(history[:, n_full : n_full + self.slots], "b s m d -> b m s d").clone()
        return self.unchunked(context, pending, length), {"queue": queue}

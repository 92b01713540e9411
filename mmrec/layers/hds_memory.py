"""The ``hds`` long-term memory: chunked write, scanned update, hierarchical read.

The sequence is cut into chunks of ``C`` tokens. Per bank, ``M`` slots of width ``dim``:

- write: after chunk ``c`` each slot pools the chunk's keys/values with a learned slot
  query (attention over the chunk), ``w_c`` ``[banks, M, dim]``, and a per-slot write gate
  ``β_c = σ(w_c · u + b)``;
- update: ``Mem_c = (1 - β_c) ⊙ Mem_{c-1} + β_c ⊙ w_c``, a linear recurrence over chunks
  solved by the scan op (no loop over chunks);
- read: tokens of chunk ``c`` attend over ``Mem_{c-1}`` and its HDS levels (level 1 pools
  4 slots into one, level 2 pools 16), so no token sees its own chunk.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, repeat
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor, nn

from mmrec.layers.memory_attention import MemoryAttention
from mmrec.ops import accumulation_dtype, linear_scan

LEVEL_POOL = {0: 1, 1: 4, 2: 16}  # slots pooled into one, per HDS level


class HDSMemory(nn.Module):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["hds"] = "hds"
        slots: PositiveInt = Field(64, description="M: level-0 slots per bank")
        banks: PositiveInt = Field(1, description="independent memory banks (the seeds' num_memories)")
        dim: PositiveInt = Field(64, description="width of one slot (the seeds' mem_dim)")
        levels: list[Literal[0, 1, 2]] = Field([0, 1, 2], min_length=1, description="HDS levels the read attends over")

        @model_validator(mode="after")
        def _levels_fit(self):
            if len(set(self.levels)) != len(self.levels):
                raise ValueError(f"levels must not repeat, got {self.levels}")
            pool = max(LEVEL_POOL[level] for level in self.levels)
            if self.slots % pool:
                raise ValueError(f"slots ({self.slots}) must be divisible by {pool} for HDS levels {self.levels}")
            return self

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.banks, self.slots, self.dim = config.banks, config.slots, config.dim
        self.levels = sorted(config.levels)
        self.key_dim = config.banks * config.dim  # width of the k and v the block projects
        self.slot_queries = nn.Parameter(torch.empty(config.banks, config.slots, config.dim))
        self.initial = nn.Parameter(torch.empty(config.banks, config.slots, config.dim))  # Mem_{-1}
        self.write_gate = nn.Parameter(torch.empty(config.banks, config.dim))
        self.write_gate_bias = nn.Parameter(torch.empty(config.banks, config.slots))
        self.read = MemoryAttention(n_heads, d_model // n_heads, config.banks, config.dim, init_std)
        self.init_std = init_std
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.slot_queries, std=1.0)
        nn.init.normal_(self.initial, std=self.init_std)
        nn.init.normal_(self.write_gate, std=self.init_std)
        nn.init.zeros_(self.write_gate_bias)

    def write(self, k: Tensor, v: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Pool each chunk into the slots. ``k``, ``v``: ``[B, n, C, banks*dim]``.

        Returns the update's ``(keep, written)``, both ``[B, n, banks, M, dim]`` in float32
        (float64 for float64 inputs).
        """
        batch = k.shape[0]
        keys = rearrange(k, "b n c (m d) -> (b n) m c d", m=self.banks)
        values = rearrange(v, "b n c (m d) -> (b n) m c d", m=self.banks)
        queries = repeat(self.slot_queries.to(k.dtype), "m s d -> bn m s d", bn=keys.shape[0])
        mask = None if valid is None else repeat(valid, "n c -> (b n) 1 1 c", b=batch)
        pooled = nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        acc = accumulation_dtype(k.dtype)
        pooled = rearrange(pooled, "(b n) m s d -> b n m s d", b=batch).to(acc)
        gate_logit = torch.einsum("bnmsd,md->bnms", pooled, self.write_gate.to(acc)) + self.write_gate_bias.to(acc)
        beta = torch.sigmoid(gate_logit).unsqueeze(-1)
        return (1 - beta).expand_as(pooled), beta * pooled

    def hierarchy(self, memory: Tensor) -> Tensor:
        """HDS levels of ``[..., M, dim]`` slots, concatenated along the slot axis."""
        levels = [
            memory if level == 0 else memory.unflatten(-2, (self.slots // LEVEL_POOL[level], LEVEL_POOL[level])).mean(-2)
            for level in self.levels
        ]
        return torch.cat(levels, dim=-2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, memory: Tensor | None = None, dropout: float = 0.0) -> tuple[Tensor, Tensor]:
        """``q``: ``[B, T, d_model]``; ``k``, ``v``: ``[B, T, banks*dim]``; ``memory``: ``[B, banks, M, dim]``.

        Returns the read context ``[B, T, d_model]`` and the memory after the last chunk.
        """
        batch, length, _ = q.shape
        n_chunks = -(-length // chunk_size)
        pad = n_chunks * chunk_size - length
        valid = None
        if pad:
            q, k, v = (nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            valid = (torch.arange(n_chunks * chunk_size, device=q.device) < length).view(n_chunks, chunk_size)
        chunked = lambda x: rearrange(x, "b (n c) d -> b n c d", c=chunk_size)  # noqa: E731
        keep, written = self.write(chunked(k), chunked(v), valid)
        if memory is None:
            memory = self.initial.expand(batch, -1, -1, -1)
        memory = memory.reshape(batch, -1).to(keep.dtype)
        flat = lambda x: x.reshape(batch, n_chunks, -1)  # noqa: E731
        after, last = linear_scan(flat(keep), flat(written), memory)
        # chunk c reads the memory as it was before chunk c was written
        before = torch.cat([memory.unsqueeze(1), after[:, :-1]], dim=1)
        before = before.view(batch * n_chunks, self.banks, self.slots, self.dim)
        queries = rearrange(q, "b (n c) d -> (b n) c d", c=chunk_size)
        context = self.read(queries, self.hierarchy(before), dropout)
        context = rearrange(context, "(b n) c d -> b (n c) d", b=batch)[:, :length]
        return context, last.view(batch, self.banks, self.slots, self.dim)

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

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Pool each complete chunk into the slots. ``k``, ``v``: ``[B, n, C, banks*dim]``.

        Returns the update's ``(keep, written)``, both ``[B, n, banks, M, dim]`` in float32
        (float64 for float64 inputs).
        """
        batch = k.shape[0]
        keys = rearrange(k, "b n c (m d) -> (b n) m c d", m=self.banks)
        values = rearrange(v, "b n c (m d) -> (b n) m c d", m=self.banks)
        queries = repeat(self.slot_queries.to(k.dtype), "m s d -> bn m s d", bn=keys.shape[0])
        pooled = nn.functional.scaled_dot_product_attention(queries, keys, values)
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

    def initial_state(self, batch: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """The state before any token: the learned initial memory and no pending chunk."""
        return {
            "memory": self.initial.to(accumulation_dtype(dtype)).expand(batch, -1, -1, -1),
            "pending_k": self.initial.new_zeros(batch, 0, self.key_dim, dtype=dtype),
            "pending_v": self.initial.new_zeros(batch, 0, self.key_dim, dtype=dtype),
        }

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, state: dict[str, Tensor] | None = None, dropout: float = 0.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``q``: ``[B, T, d_model]``; ``k``, ``v``: ``[B, T, banks*dim]``.

        ``state`` continues an earlier call: ``memory`` ``[B, banks, M, dim]`` after the last
        complete chunk, and the keys/values of the chunk in progress (``pending_k``,
        ``pending_v``, fewer than ``chunk_size`` tokens). Returns the read context
        ``[B, T, d_model]`` and the state after these tokens.
        """
        batch, length, _ = q.shape
        state = self.initial_state(batch, k.dtype) if state is None else state
        pending = state["pending_k"].shape[1]
        if pending:
            k = torch.cat([state["pending_k"].to(k.dtype), k], dim=1)
            v = torch.cat([state["pending_v"].to(v.dtype), v], dim=1)
        memory = state["memory"].to(accumulation_dtype(k.dtype)).reshape(batch, -1)
        total = pending + length  # positions counted from the start of the pending chunk
        n_full = total // chunk_size

        # write every complete chunk; the update over chunks is one scan
        memories = memory.unsqueeze(1)  # memories[:, c]: the memory chunk c reads
        if n_full:
            chunked = lambda x: rearrange(x[:, : n_full * chunk_size], "b (n c) d -> b n c d", c=chunk_size)  # noqa: E731
            keep, written = self.write(chunked(k), chunked(v))
            after, _ = linear_scan(keep.reshape(batch, n_full, -1), written.reshape(batch, n_full, -1), memory)
            memories = torch.cat([memories, after], dim=1)

        # read: the token at position t reads memories[:, t // chunk_size]
        n_read = -(-total // chunk_size)
        if n_read == 1:
            queries = q  # every new token is in one chunk (always so when decoding)
        else:
            queries = nn.functional.pad(q, (0, 0, pending, n_read * chunk_size - total))
        queries = rearrange(queries, "b (n c) d -> (b n) c d", n=n_read)
        slots = memories[:, :n_read].reshape(batch * n_read, self.banks, self.slots, self.dim)
        context = rearrange(self.read(queries, self.hierarchy(slots), dropout), "(b n) c d -> b (n c) d", b=batch)
        if n_read > 1:
            context = context[:, pending:total]
        next_state = {
            "memory": memories[:, n_full].view(batch, self.banks, self.slots, self.dim),
            "pending_k": k[:, n_full * chunk_size :],
            "pending_v": v[:, n_full * chunk_size :],
        }
        return context, next_state

"""The ``hds`` long-term memory: chunked write, scanned update, hierarchical read.

The sequence is cut into chunks of ``C`` tokens. Per bank, ``M`` slots of width ``dim``:

- write: after chunk ``c`` each slot pools the chunk's keys/values with a learned slot
  query (attention over the chunk), ``w_c`` ``[banks, M, dim]``, and a per-slot write gate
  ``β_c = σ(w_c · u + b)``;
- update: ``Mem_c = (1 - β_c) ⊙ Mem_{c-1} + β_c ⊙ w_c``, a linear recurrence over chunks
  solved by the scan op (no loop over chunks);
- read: tokens of chunk ``c`` attend over ``Mem_{c-1}`` and its HDS levels (level 1 pools
  4 slots into one, level 2 pools 16, level 3 pools 64), so no token sees its own chunk;
  with ``own_value`` (off by default) each token's read also adds its own value, the
  seeds' ``0.1 · v_t``.

The state is ``memory`` ``[B, banks, M, dim]`` (float32) after the last complete chunk and,
carried by :class:`mmrec.contracts.ChunkedMemory`, the chunk in progress.

Document resets (``resets`` ``[B, T]``, True at a document's first token): the memory
forgets at a document start. A chunk that contains a start is written onto the learned
initial memory, not onto the memory before it (``keep = 0``, ``written = (1 - β) ⊙ initial
+ β ⊙ w``), and its slots pool only its tokens from its last start on; so a document that
starts on a chunk's first token gets the memory a fresh sequence gets, and one that
starts inside a chunk has that chunk's part of it written. Tokens at or after a start in
their chunk read ``initial`` in place of the memory before their chunk; the tokens before
the start read as without resets. The reset stays inside the scan over chunks, and the
initial memory's read is one more read of every token, taken where needed. ``own_value``
is per token and needs nothing.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor, nn

from mmrec.contracts import ChunkedMemory
from mmrec.layers.memory_attention import MemoryAttention
from mmrec.ops import accumulation_dtype, linear_scan

LEVEL_POOL = {0: 1, 1: 4, 2: 16, 3: 64}  # slots pooled into one, per HDS level


class _SlotPooling(torch.autograd.Function):
    """``softmax(Q Kᵀ) V`` of the write: the same slot queries ``Q`` ``[banks, M, dim]`` over
    each chunk's keys and values ``[N, banks, C, dim]``; ``Q`` comes scaled.

    Plain products, not SDPA: the slot width is the head width here (512 in ``1b``), past
    what the flash and cuDNN kernels take, and the memory-efficient kernel left for it
    takes 2-2.6x as long at ``1b``'s shapes (docs/benchmarks.md, "The write's pooling as
    products"). Like a fused kernel it keeps only each row's log-sum-exp for the backward,
    which recomputes the weights: saved, ``[N, banks, M, C]`` weights would be the largest
    thing the block keeps (``banks * M`` per token against ``d_model``)."""

    @staticmethod
    def scores(queries: Tensor, keys: Tensor) -> Tensor:
        """``Q Kᵀ`` per chunk and bank ``[N, banks, M, C]`` in the accumulation dtype."""
        return torch.einsum("msd,nmcd->nmsc", queries, keys).to(accumulation_dtype(keys.dtype))

    @staticmethod
    def masked_scores(queries: Tensor, keys: Tensor, pooled: Tensor | None) -> Tensor:
        """:meth:`scores`, ``−∞`` for the keys that ``pooled`` ``[N, C]`` leaves out."""
        scores = _SlotPooling.scores(queries, keys)
        return scores if pooled is None else scores.masked_fill(~pooled[:, None, None, :], float("-inf"))

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, values: Tensor, pooled: Tensor | None = None) -> Tensor:
        scores = _SlotPooling.masked_scores(queries, keys, pooled)
        lse = scores.logsumexp(-1, keepdim=True)  # [N, banks, M, 1]
        out = (scores - lse).exp().to(values.dtype) @ values  # [N, banks, M, dim]
        ctx.save_for_backward(queries, keys, values, lse, out, pooled)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        queries, keys, values, lse, out, pooled = ctx.saved_tensors
        weights = (_SlotPooling.masked_scores(queries, keys, pooled) - lse).exp()
        grad = grad.to(values.dtype)
        grad_values = weights.to(values.dtype).transpose(-1, -2) @ grad
        # softmax backward: w ⊙ (dL/dw − Σ_c w dL/dw), where Σ_c w dL/dw = Σ_d grad ⊙ out
        row = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)
        grad_scores = (weights * ((grad @ values.transpose(-1, -2)).to(lse.dtype) - row)).to(keys.dtype)
        grad_queries = torch.einsum("nmsc,nmcd->msd", grad_scores, keys)
        grad_keys = torch.einsum("nmsc,msd->nmcd", grad_scores, queries)
        return grad_queries, grad_keys, grad_values, None


class HDSMemory(ChunkedMemory):
    supports_resets = True  # a document start resets the memory (module docstring)

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["hds"] = "hds"
        slots: PositiveInt = Field(64, description="M: level-0 slots per bank")
        banks: PositiveInt = Field(1, description="independent memory banks (the seeds' num_memories)")
        dim: PositiveInt = Field(64, description="width of one slot (the seeds' mem_dim)")
        levels: list[Literal[0, 1, 2, 3]] = Field(
            [0, 1, 2], min_length=1,
            description="HDS levels the read attends over: level l pools 4^l slots into one (1, 4, 16, 64)",
        )
        own_value: float = Field(
            0.0, allow_inf_nan=False, description="weight of each token's own value, projected as the slots' values are, added to its read "
                             "(the seeds' 0.1·v_t); 0: off",
        )

        @model_validator(mode="after")
        def _levels_fit(self):
            if len(set(self.levels)) != len(self.levels):
                raise ValueError(f"levels must not repeat, got {self.levels}")
            pool = max(LEVEL_POOL[level] for level in self.levels)
            if self.slots % pool:
                raise ValueError(f"slots ({self.slots}) must be divisible by {pool} for HDS levels {self.levels}")
            return self

        def check_model(self, model) -> None:
            """The read splits the model's heads over the banks."""
            if model.n_heads % self.banks:
                raise ValueError(f"memory.banks ({self.banks}) must divide n_heads ({model.n_heads})")

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.banks, self.slots, self.dim = config.banks, config.slots, config.dim
        self.levels = sorted(config.levels)
        self.own_value = config.own_value
        self.key_dim = config.banks * config.dim  # width of the k and v the block projects
        self.slot_queries = nn.Parameter(torch.empty(config.banks, config.slots, config.dim))
        self.initial = nn.Parameter(torch.empty(config.banks, config.slots, config.dim))  # Mem_{-1}
        self.write_gate = nn.Parameter(torch.empty(config.banks, config.dim))
        self.write_gate_bias = nn.Parameter(torch.empty(config.banks, config.slots))
        self.read = MemoryAttention(n_heads, d_model // n_heads, config.banks, config.dim, init_std)
        self.d_model = d_model
        self.init_std = init_std
        self.init_weights()

    def flops_per_token(self, length: int, chunk_size: int) -> float:
        """Training FLOPs per token of the write (slot queries over the chunk's keys and
        values) and of the read (q·k and p·v over every level's slots); forward and
        backward, 3 x 2 x 2 per multiply-add pair. With ``own_value``, each token's value
        also passes the read's value projection (the parameter count covers its use on the
        slots, not this second use): 3 x 2 per multiply-add."""
        read_slots = sum(self.slots // LEVEL_POOL[level] for level in self.levels)
        own = 6 * self.key_dim * self.read.head_dim if self.own_value else 0
        return 12 * read_slots * self.d_model + 12 * self.slots * self.key_dim + own

    def init_weights(self) -> None:
        nn.init.normal_(self.slot_queries, std=1.0)
        nn.init.normal_(self.initial, std=self.init_std)
        nn.init.normal_(self.write_gate, std=self.init_std)
        nn.init.zeros_(self.write_gate_bias)

    def write(self, k: Tensor, v: Tensor, pooled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pool each complete chunk into the slots. ``k``, ``v``: ``[B, n, C, banks*dim]``;
        ``pooled``: ``[B, n, C]`` bool, the tokens each chunk pools (default all).

        Returns the update's ``keep = 1 - β`` ``[banks, B, M, n]`` and ``written = β ⊙ w``
        ``[banks, B, M, n, dim]`` (a strided view), in float32 (float64 for float64 inputs):
        bank-major, so that the read projects each bank's memories in one matmul.
        """
        batch = k.shape[0]
        keys = rearrange(k, "b n c (m d) -> (b n) m c d", m=self.banks)
        values = rearrange(v, "b n c (m d) -> (b n) m c d", m=self.banks)
        # the scale folded into the queries before the cast, as SDPA scales before rounding
        queries = (self.slot_queries * self.dim**-0.5).to(k.dtype)
        pooled = _SlotPooling.apply(queries, keys, values, None if pooled is None else pooled.flatten(0, 1))  # [(b n), banks, M, dim]
        pooled = rearrange(pooled, "(b n) m s d -> m b s n d", b=batch)  # a view
        acc = accumulation_dtype(k.dtype)
        # elementwise and a sum, not a matmul, so that a compiled backward recomputes the
        # float32 copy of the pooled slots instead of storing it
        gate_logit = (pooled.to(acc) * self.write_gate.to(acc)[:, None, None, None, :]).sum(-1)
        beta = torch.sigmoid(gate_logit + self.write_gate_bias.to(acc)[:, None, :, None])
        return 1 - beta, beta.unsqueeze(-1) * pooled  # the product saves the pooled slots in k's dtype

    def hierarchy(self, memory: Tensor) -> Tensor:
        """HDS levels of ``[..., M, width]`` slots (or their keys or values), concatenated
        along the slot axis."""
        levels = [
            memory if level == 0 else memory.unflatten(-2, (self.slots // LEVEL_POOL[level], LEVEL_POOL[level])).mean(-2)
            for level in self.levels
        ]
        return torch.cat(levels, dim=-2)

    def initial_memory(self, batch: int, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Tensor]:
        """The learned initial memory ``[B, banks, M, dim]``, in float32 (float64 for float64)."""
        return {"memory": self.initial.to(device=device, dtype=accumulation_dtype(dtype)).expand(batch, -1, -1, -1)}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, memory: dict[str, Tensor], chunk_size: int, pending: int,
               dropout: float, *, resets: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``q``: ``[B, T, d_model]``; ``k``, ``v``: ``[B, pending + T, banks*dim]``, from the
        chunk in progress's first token; ``memory``: ``[B, banks, M, dim]`` after the last
        complete chunk; ``resets``: ``[B, pending + T]`` bool, document starts. Returns the
        read context ``[B, T, d_model]`` and the memory after the chunks these tokens complete."""
        batch, length, _ = q.shape
        total = pending + length  # positions counted from the start of the pending chunk
        n_full = total // chunk_size
        banks, slots, dim = self.banks, self.slots, self.dim
        mem = memory["memory"].to(accumulation_dtype(k.dtype))  # [B, banks, M, dim]
        if resets is not None:
            # started[:, c, i]: a document starts at or before place i of chunk c, in that chunk
            n_chunks = -(-total // chunk_size)
            by_chunk = nn.functional.pad(resets.long(), (0, n_chunks * chunk_size - total)).unflatten(
                1, (n_chunks, chunk_size))  # [B, n_chunks, C]
            started = by_chunk.cumsum(-1) > 0  # [B, n_chunks, C]
            reads_initial = started.flatten(1)[:, pending:total]  # [B, T]
            chunk_resets = started[:, :n_full, -1]  # [B, n_full]: a document starts in the chunk
            # what each complete chunk pools: its tokens from its last start on (all, without one)
            later_starts = by_chunk.flip(-1).cumsum(-1).flip(-1) - by_chunk  # starts after each place, in its chunk
            pooled = (later_starts == 0)[:, :n_full]  # [B, n_full, C]

        # memories[:, :, :, c]: the memory chunk c reads, [banks, B, M, n_full + 1, dim].
        # Every complete chunk is written and the update over chunks is one scan, one row
        # per (bank, sequence, slot); its first step (keep 0) puts the starting memory in
        # place, so the scan's output is every memory read, with no copy after it.
        memories = mem.transpose(0, 1).unsqueeze(3)
        if n_full:
            keep, written = self.write(self.complete_chunks(k, chunk_size), self.complete_chunks(v, chunk_size),
                                       None if resets is None else pooled)
            if resets is not None:  # a chunk with a document start is written onto the initial memory
                chunk_resets = chunk_resets[None, :, None, :]  # [1, B, 1, n_full], as keep
                onto_initial = keep.unsqueeze(-1) * self.initial[:, None, :, None].to(keep.dtype) + written
                written = torch.where(chunk_resets[..., None], onto_initial.to(written.dtype), written)
                keep = keep.masked_fill(chunk_resets, 0)
            keep = torch.cat([keep.new_zeros(banks, batch, slots, 1), keep], dim=-1)
            written = torch.cat([memories, written], dim=3)
            rows = banks * batch * slots
            # keep is broadcast over the slot width: a stride-0 view the scan reads in place.
            # The memories are stored in the activations' dtype (the read casts them to it
            # anyway, and autograd keeps them); the last one, carried on, in float32.
            keep = keep.view(rows, n_full + 1, 1).expand(-1, -1, dim)
            memories, last = linear_scan(keep, written.view(rows, n_full + 1, dim), out_dtype=q.dtype)
            memories = memories.view(banks, batch, slots, n_full + 1, dim)
            mem = last.view(banks, batch, slots, dim).transpose(0, 1).contiguous()

        # read: the token at position t reads memories[:, :, :, t // chunk_size]
        queries = self.chunked_queries(q, pending, chunk_size)  # [B, n_read, C, d]
        n_read = queries.shape[1]
        # project the slots to keys and values before pooling the HDS levels (both are
        # linear, so they commute): the levels are then pooled at the narrower head width
        read_slots = memories[:, :, :, :n_read].to(q.dtype).reshape(banks, batch * slots * n_read, dim)
        keys, values = (
            self.hierarchy(rearrange(x, "m (b s n) e -> (b n) m s e", b=batch, n=n_read)) for x in self.read.project(read_slots)
        )
        context = self.read.attend(queries.flatten(0, 1), keys, values, dropout).unflatten(0, (batch, n_read))
        context = self.unchunked(context, pending, length)
        if resets is not None:  # tokens at or after a document start in their chunk read the initial memory
            context = torch.where(reads_initial[..., None], self.read_initial(q, dropout), context)
        if self.own_value:
            context = context + self.own_value * self.read.head_values(v[:, pending:])
        return context, {"memory": mem}  # the memory in float32

    def read_initial(self, q: Tensor, dropout: float = 0.0) -> Tensor:
        """The context ``[B, T, d_model]`` of reading the learned initial memory, for ``q``
        ``[B, T, d_model]``: every sequence reads the same slots, so the tokens form one batch."""
        keys, values = (self.hierarchy(x)[None] for x in self.read.project(self.initial.to(q.dtype)))  # [1, banks, S, e]
        return self.read.attend(q.reshape(1, -1, q.shape[-1]), keys, values, dropout).reshape(q.shape)

    # Static decoding (mmrec.decode): one token per step, fixed shapes, buffers updated in
    # place, so that the step can be captured in a CUDA graph. The memory changes only when
    # a chunk completes, so its keys and values (the read's projection of the slots and
    # their HDS levels) are cached in the state: an ordinary step only records its key and
    # value in the chunk in progress and attends over the cached ones. The step that
    # completes a chunk is followed by `complete_chunk` (the decoder replays a second CUDA
    # graph for it): the write, the update and the new keys and values, once per chunk.

    def static_memory(self, memory: dict[str, Tensor], batch: int, chunk_size: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """``memory`` ``[B, banks, M, dim]`` (a copy) and the keys and values the read attends
        over, ``[B, banks, S, head_dim]`` (S: slots of all levels)."""
        static = {"memory": memory["memory"].to(accumulation_dtype(dtype)).clone().contiguous()}
        static["keys"], static["values"] = self.read_keys_values(static["memory"], dtype)
        return static

    def read_keys_values(self, memory: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The keys and values ``[B, banks, S, head_dim]`` the read attends over for
        ``memory`` ``[B, banks, M, dim]``, computed as ``forward`` computes them."""
        batch = memory.shape[0]
        slots = memory.to(dtype).transpose(0, 1).reshape(self.banks, batch * self.slots, self.dim)
        return tuple(self.hierarchy(rearrange(x, "m (b s) e -> b m s e", b=batch)) for x in self.read.project(slots))

    def eager_memory(self, static: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"memory": static["memory"].clone()}

    def read_step(self, q: Tensor, static: dict[str, Tensor], index: Tensor, chunk_size: int) -> Tensor:
        """The memory before this chunk, read through the cached keys and values."""
        context = self.read.attend(q, static["keys"], static["values"])
        if self.own_value:
            context = context + self.own_value * self.read.head_values(static["pending_v"].index_select(1, index))
        return context

    def complete_chunk(self, static: dict[str, Tensor]) -> None:
        """Write the complete chunk in ``static`` to its memory, in place (``write`` and the
        update, as ``forward`` does for one chunk), and cache the new keys and values."""
        keep, written = self.write(static["pending_k"].unsqueeze(1), static["pending_v"].unsqueeze(1))
        # [banks, B, M, 1] and [banks, B, M, 1, dim] -> the memory's [B, banks, M, dim]
        keep, written = keep.transpose(0, 1), written.squeeze(3).transpose(0, 1)
        memory = static["memory"]
        memory.copy_(keep * memory + written)
        keys, values = self.read_keys_values(memory, static["keys"].dtype)
        static["keys"].copy_(keys)
        static["values"].copy_(values)

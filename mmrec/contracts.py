"""The contracts of mmrec's three extension points: a block, a recurrence, a memory.

Each is a small ``nn.Module`` base class whose methods are the capabilities the rest of
mmrec calls, with the defaults a variant that does not need one gets. The core calls
them directly (``self.recurrence.decay_width(...)``), never by probing for attributes.

- :class:`Block`: what :mod:`mmrec.model` and :mod:`mmrec.decode` call on a model block
  (the ``mmrec.layers`` entry a recipe's ``arch`` selects);
- :class:`Recurrence`: what the MM-Rec block calls on its recurrence (``mmrec.recurrences``);
- :class:`Memory`: what the MM-Rec block calls on its memory (``mmrec.memories``), and
  :class:`ChunkedMemory`, a memory written once per chunk that owns the chunk in progress:
  a subclass writes complete chunks and reads, nothing else.

A variant that subclasses plain ``nn.Module`` still works: :func:`with_defaults` (called
when the block builds its variants) derives a class from it and the base, so the
variant's own attributes win and the missing ones are the base's defaults. Its parameter
names, and so checkpoints, are unchanged.

Shapes: ``B`` batch, ``T`` new tokens, ``C`` the block's ``chunk_size``, ``d`` ``d_model``.
Document resets: a packed training sequence holds several documents. ``resets`` ``[B, T]``
bool is ``True`` at the first token of each document, and a variant that takes it
(``supports_resets``) lets nothing from before that token reach it or any later token of
its sequence: the short-term state starts again, a memory forgets. A variant without it
gets a clear error when resets are asked for, never silently ignored resets.
:mod:`mmrec.documents` has the helpers (document starts from token ids, document ids).

Dtypes: under autocast (bf16 training) every tensor handed to a variant is in the
activations' dtype; a variant accumulates in :func:`mmrec.ops.accumulation_dtype` (float32
for 16-bit inputs, float64 for float64, which the conformance suite uses) and returns its
outputs in its inputs' dtype; carried states may stay in the accumulation dtype.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Block", "ChunkedMemory", "Memory", "Recurrence", "with_defaults"]

StateTree = Any  # a tensor or a (nested) dict of tensors: what a layer carries between calls


def _missing(variant: nn.Module, method: str) -> str:
    contract = next(base.__name__ for base in type(variant).__mro__ if base.__module__ == __name__)
    return f"{type(variant).__name__} must implement {method} (see mmrec.contracts.{contract}.{method})"


class Block(nn.Module):
    """A model block: ``LanguageModel`` stacks ``n_layers`` of them, built as
    ``Block(config, layer=i)`` from the recipe's model config.

    Required: ``forward``. Static decoding (:class:`mmrec.decode.StaticDecoder`, CUDA
    graphs) needs ``supports_static() -> True`` and the four static methods; a block
    without them decodes with eager steps (``mmrec.generate`` picks that by itself).
    """

    chunk_size: int | None = None
    """Tokens after which a static decode step must be followed by :meth:`complete_chunk`
    (the decoder counts them on the host); ``None``: never."""

    def forward(self, x: Tensor, state: dict | None = None, return_aux_loss: bool = False,
                position: int | Tensor = 0, *, resets: Tensor | None = None) -> tuple[Tensor, dict, Tensor | None]:
        """``x`` ``[B, T, d]`` -> ``(x [B, T, d], next_state, aux_loss or None)``.

        ``state`` is what the previous call returned (``None`` at the start), ``position`` the
        number of tokens before ``x``. Feeding a sequence in pieces with the state carried
        must give what one pass gives, and the output at ``t`` may depend on tokens ``<= t``
        only. A ``position`` tensor (0-dim int64) marks a static decode step: ``T = 1``,
        ``state`` is the block's static buffers, updated in place (no host synchronisation).
        ``resets`` ``[B, T]`` bool (only passed to a block whose :meth:`supports_resets` is
        true): document starts, as the module docstring says."""
        raise NotImplementedError(_missing(self, "forward"))

    def supports_resets(self) -> bool:
        """Whether :meth:`forward` takes ``resets`` (document starts in a packed sequence)."""
        return False

    def residual_projections(self) -> list[nn.Linear]:
        """The linears that write into the residual stream: initialised with the std scaled
        down by ``sqrt(2 n_layers)`` (GPT-2)."""
        return []

    def mixing_flops(self, length: int) -> float:
        """Training FLOPs per token (forward and backward) at sequence ``length`` that no
        parameter accounts for (attention scores, memory reads); the model adds 6 per
        parameter for MFU."""
        return 0.0

    def supports_static(self) -> bool:
        """Whether this block has a static decode step (the methods below)."""
        return False

    def static_state(self, layer: dict, *, batch: int, position: int, max_length: int | None = None,
                     kv_splits: int = 0, donate: bool = False) -> dict:
        """Fixed-size buffers that continue the eager state ``layer`` after ``position``
        tokens; ``max_length``: the most tokens a cache must hold (``None`` if unbounded)."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def static_capacity(self, static: dict) -> int | None:
        """The most tokens the buffers ``static`` can hold, or ``None`` for any number."""
        return None

    def eager_state(self, static: dict, length: int) -> dict:
        """The eager state (a copy) equal to the buffers ``static`` after ``length`` tokens."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def complete_chunk(self, static: dict) -> None:
        """Called after the static step of each chunk's last token (with ``chunk_size`` set),
        once every layer has stepped: write the chunk to the memory, in place."""


class Recurrence(nn.Module):
    """The short-term state of an MM-Rec block: ``h_t`` from ``h_{t-1}`` and the token.

    Built as ``cls(config, *, d_model, n_heads, init_std)``. The block hands it ``z`` (the
    candidate, after the optional ``short_conv`` and ``recurrence_dropout``), MDI's decay
    and, if asked for, the input gate and extra projections of the block's input.
    """

    needs_input_gate: ClassVar[bool] = False
    """The block projects a gate ``g`` ``[B, T, d]`` and passes it as ``gate`` (else ``None``)."""

    needs_decay: ClassVar[bool] = True
    """The block's MDI computes ``log γ`` for it. ``False`` for a recurrence with a decay of
    its own: no MDI is built (its parameters would get no gradient) and ``log_decay`` is ``None``."""

    supports_resets: ClassVar[bool] = False
    """``forward`` takes ``resets`` ``[B, T]`` bool: the state before a document's first token
    does not reach it (see the module docstring)."""

    narrow_decay: ClassVar[bool] = False
    """``log_decay`` in the activations' dtype (e.g. bf16) rather than the accumulation
    dtype: for a recurrence that exponentiates in float32 itself."""

    def projection_widths(self, d_model: int, n_heads: int) -> dict[str, int]:
        """Extra outputs of the block's fused input projection, ``{name: width}``, passed to
        ``forward`` as keyword arguments ``[B, T, width]`` of those names."""
        return {}

    def decay_width(self, d_model: int, n_heads: int) -> int:
        """The last dimension of ``log_decay`` (MDI's outputs per token), e.g. one per head."""
        return d_model

    def flops_per_token(self, length: int, chunk_size: int) -> float:
        """Training FLOPs per token (forward and backward) that the recurrence's parameters
        do not account for (e.g. a matrix state's updates)."""
        return 0.0

    def forward(self, z: Tensor, log_decay: Tensor | None, gate: Tensor | None, h0: StateTree | None = None,
                **projections: Tensor) -> tuple[Tensor, StateTree]:
        """``z`` ``[B, T, d]``; ``log_decay`` ``[B, T, decay_width]`` (``log γ ≤ 0``);
        ``gate`` ``[B, T, d]`` or ``None``; ``h0``: the state this returned last time, or
        ``None`` at the start. Returns ``h`` ``[B, T, d]`` (in ``z``'s dtype; the block
        normalises it) and the state to carry: a tensor or a dict of tensors whose size does
        not depend on ``T``. Causal per token; pieces with ``h0`` carried equal one pass.
        With :attr:`supports_resets`, the keyword ``resets`` ``[B, T]`` bool is passed when
        the model has document starts (never ``None``)."""
        raise NotImplementedError(_missing(self, "forward"))


_STATIC = ("static_state", "step", "complete_chunk", "eager_state")


class Memory(nn.Module):
    """The long-term memory of an MM-Rec block, read by every token, written per chunk.

    Built as ``cls(config, *, d_model, n_heads, init_std)``; sets ``key_dim``, the width of
    the ``k`` and ``v`` the block projects for it (:meth:`projection_widths` says which of
    ``q``, ``k``, ``v`` it asks for; MDI reads ``k`` too). Causality is chunk-level for what the
    memory writes: a token of chunk ``c`` may read what chunks ``< c`` wrote, and from its own
    chunk only tokens up to itself. The memory carries whatever it needs between calls
    in its state, including the chunk in progress (:class:`ChunkedMemory` does that part).
    """

    key_dim: int

    supports_resets: ClassVar[bool] = False
    """``forward`` takes ``resets`` ``[B, T]`` bool: nothing written before a document's first
    token is read by it or by a later token (see the module docstring)."""

    def projection_widths(self, d_model: int) -> dict[str, int]:
        """What the block projects for the memory, by name: ``q`` (``d_model``), ``k`` and
        ``v`` (``key_dim``). ``k`` must be among them (MDI reads it); one left out is passed
        as ``None``."""
        return {"q": d_model, "k": self.key_dim, "v": self.key_dim}

    def forward(self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, state: dict | None = None,
                dropout: float = 0.0) -> tuple[Tensor | None, dict]:
        """``q`` ``[B, T, d]``; ``k``, ``v`` ``[B, T, key_dim]`` (``None`` for one that
        :meth:`projection_widths` leaves out); ``state``: the dict of tensors
        this returned last time, or ``None`` at the start; ``dropout``: the attention dropout
        of the read (0 outside training). Returns the context ``[B, T, d]`` in the activations' dtype
        (the block adds it to the normalised state before ``W_o``), or ``None`` for a memory
        that gives none (nothing is added), and the next state, whose size does not depend
        on the length and whose tensors are not views of larger ones. With
        :attr:`supports_resets`, the keyword ``resets`` ``[B, T]`` bool is passed when the
        model has document starts (never ``None``)."""
        raise NotImplementedError(_missing(self, "forward"))

    def flops_per_token(self, length: int, chunk_size: int) -> float:
        """Training FLOPs per token (forward and backward) of the reads and writes that the
        memory's parameters do not account for."""
        return 0.0

    # static decoding: all four methods, or none (then the model decodes with eager steps)

    def supports_static(self) -> bool:
        """Whether the four static-decode methods below are implemented."""
        return all(getattr(type(self), name) is not getattr(Memory, name) for name in _STATIC)

    def static_state(self, state: dict, batch: int, chunk_size: int, dtype: torch.dtype | None = None) -> dict:
        """Fixed-size buffers that continue the eager ``state``; ``dtype``: the activations'."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def step(self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, static: dict,
             position: Tensor) -> tuple[Tensor | None, dict]:
        """One token (``T = 1``) at ``position``, a 0-dim int64 tensor: update ``static`` in
        place, with no host synchronisation (it is captured in a CUDA graph), and return the
        context ``[B, 1, d]`` (or ``None``, as :meth:`forward`) and ``static``."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def complete_chunk(self, static: dict) -> None:
        """Called after the step of each chunk's last token, once every layer has stepped:
        write the chunk in ``static`` to the memory, in place."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def eager_state(self, static: dict, pending: int) -> dict:
        """The eager state (copies) equal to ``static`` with ``pending`` tokens in the chunk in progress."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")


PENDING = ("pending_k", "pending_v")
CHUNK_IN_PROGRESS = (*PENDING, "pending_resets")  # what the base carries besides the subclass's memory


class ChunkedMemory(Memory):
    """A memory written once per chunk of ``C`` tokens, which owns the chunk in progress.

    The state is the subclass's memory (a dict of tensors) plus ``pending_k``, ``pending_v``
    ``[B, < C, key_dim]``: the keys and values of the chunk not yet complete, carried from
    call to call (so pieces equal one pass) and prepended to the next call's. A subclass
    implements :meth:`initial_memory` and :meth:`attend`; for static decoding also
    :meth:`static_memory`, :meth:`read_step`, :meth:`complete_chunk` and :meth:`eager_memory`
    (the chunk in progress is then kept at full size in ``static["pending_k"]`` and
    ``static["pending_v"]`` ``[B, C, key_dim]``, each step writing its token's entry).

    Document starts: a subclass that sets ``supports_resets`` gets ``resets`` in
    :meth:`attend`, aligned with ``k`` and ``v``. The state then also carries the chunk in
    progress's ``pending_resets`` ``[B, < C]`` bool (missing: no starts there), so that a
    start inside a chunk still counts when a later call completes the chunk.
    """

    def initial_memory(self, batch: int, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Tensor]:
        """The memory before any token (without the chunk in progress)."""
        raise NotImplementedError(_missing(self, "initial_memory"))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, memory: dict[str, Tensor], chunk_size: int, pending: int,
               dropout: float, *, resets: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Read and write: ``q`` ``[B, T, d]``, the new tokens; ``k``, ``v`` ``[B, pending + T,
        key_dim]``, the chunk in progress from its first token on (its ``pending`` earlier
        tokens, then the new ones); ``memory``: after the last complete chunk. Returns the
        context ``[B, T, d]`` and the memory after the ``(pending + T) // C`` complete chunks.
        ``resets`` ``[B, pending + T]`` bool, aligned with ``k`` and ``v`` (passed only to a
        memory with ``supports_resets``, and only when there are document starts): ``True``
        at each document's first token; nothing written before it may reach it or a later
        token, neither through the context nor through the returned memory."""
        raise NotImplementedError(_missing(self, "attend"))

    def initial_state(self, batch: int, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Tensor]:
        """The state before any token: the initial memory and an empty chunk in progress."""
        memory = self.initial_memory(batch, dtype, device)
        if device is None and memory:
            device = next(iter(memory.values())).device
        empty = torch.zeros(batch, 0, self.key_dim, dtype=dtype, device=device)
        return {**memory, "pending_k": empty, "pending_v": empty}

    def forward(self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, state: dict[str, Tensor] | None = None,
                dropout: float = 0.0, resets: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`Memory.forward`: the chunk in progress put in front of ``k``, ``v`` (and of
        ``resets``), then :meth:`attend`; the tokens after the last complete chunk carried on."""
        batch, length, _ = q.shape
        state = self.initial_state(batch, k.dtype, k.device) if state is None else state
        pending = state["pending_k"].shape[1]
        if resets is not None and (resets.shape != (batch, length) or resets.dtype != torch.bool):
            raise ValueError(f"resets must be a bool tensor [B, T] = {[batch, length]} like the tokens, "
                             f"got {resets.dtype} {list(resets.shape)}")
        if resets is None and "pending_resets" in state:  # the chunk in progress may hold a start
            resets = torch.zeros(batch, length, dtype=torch.bool, device=q.device)
        if pending:
            k = torch.cat([state["pending_k"].to(k.dtype), k], dim=1)
            v = torch.cat([state["pending_v"].to(v.dtype), v], dim=1)
            if resets is not None:
                earlier = state.get("pending_resets")
                earlier = resets.new_zeros(batch, pending) if earlier is None else earlier.to(resets.device)
                resets = torch.cat([earlier, resets], dim=1)
        memory = {name: value for name, value in state.items() if name not in CHUNK_IN_PROGRESS}
        if resets is None:
            context, memory = self.attend(q, k, v, memory, chunk_size, pending, dropout)
        else:
            context, memory = self.attend(q, k, v, memory, chunk_size, pending, dropout, resets=resets)
        done = (pending + length) // chunk_size * chunk_size
        # copies (under one chunk): a view would keep the whole projection's storage alive
        state = {**memory, "pending_k": k[:, done:].clone(), "pending_v": v[:, done:].clone()}
        if resets is not None:
            state["pending_resets"] = resets[:, done:].clone()
        return context, state

    # helpers for a memory that every token of a chunk reads alike (the memory before it)

    @staticmethod
    def chunked_queries(q: Tensor, pending: int, chunk_size: int) -> Tensor:
        """The new tokens' queries ``[B, T, d]`` by chunk, ``[B, n, C, d]``: ``pending`` zeros
        in front, zeros behind the last token. Unpadded (``[B, 1, T, d]``, or whole chunks)
        where no padding is needed."""
        total = pending + q.shape[1]
        n = -(-total // chunk_size)
        if n > 1 and (pending or total < n * chunk_size):
            q = nn.functional.pad(q, (0, 0, pending, n * chunk_size - total))
        return q.unflatten(1, (n, -1))

    @staticmethod
    def unchunked(context: Tensor, pending: int, length: int) -> Tensor:
        """The inverse of :meth:`chunked_queries`: ``[B, n, C, d]`` -> the ``length`` new
        tokens' ``[B, T, d]``."""
        n = context.shape[1]
        context = context.flatten(1, 2)
        return context[:, pending : pending + length] if n > 1 else context

    @staticmethod
    def complete_chunks(x: Tensor, chunk_size: int) -> Tensor:
        """The complete chunks of ``x`` ``[B, L, w]`` (from a chunk's start): ``[B, L // C, C, w]``."""
        n = x.shape[1] // chunk_size
        return x[:, : n * chunk_size].unflatten(1, (n, chunk_size))

    # static decoding

    def supports_static(self) -> bool:
        return all(getattr(type(self), name) is not getattr(ChunkedMemory, name)
                   for name in ("static_memory", "read_step", "complete_chunk", "eager_memory"))

    def static_memory(self, memory: dict[str, Tensor], batch: int, chunk_size: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Buffers of the memory (a copy of the eager ``memory``, plus anything the read
        caches), of fixed sizes; the base adds the chunk in progress."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def read_step(self, q: Tensor, static: dict[str, Tensor], index: Tensor, chunk_size: int) -> Tensor:
        """The context ``[B, 1, d]`` of one token, ``q`` ``[B, 1, d]``, whose key and value are
        already in ``static["pending_k"]``, ``static["pending_v"]`` at ``index`` (its place in
        its chunk, a ``[1]`` int64 tensor; later entries are stale)."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def complete_chunk(self, static: dict) -> None:
        """Write the complete chunk ``static["pending_k"]``, ``static["pending_v"]`` into the
        memory's buffers, in place."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def eager_memory(self, static: dict[str, Tensor]) -> dict[str, Tensor]:
        """The eager memory (copies, without the chunk in progress) equal to ``static``."""
        raise NotImplementedError(f"{type(self).__name__} has no static decode step")

    def static_state(self, state: dict[str, Tensor], batch: int, chunk_size: int,
                     dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        dtype = dtype or state["pending_k"].dtype
        if "pending_resets" in state and state["pending_resets"].any():
            raise ValueError(f"{type(self).__name__}'s static decoding takes no document starts, and the chunk in "
                             "progress holds one (state['pending_resets']): decode with eager steps, or start "
                             "static decoding after that chunk completes")
        memory = {name: value for name, value in state.items() if name not in CHUNK_IN_PROGRESS}
        static = self.static_memory(memory, batch, chunk_size, dtype)
        pending = state["pending_k"].shape[1]
        for name in PENDING:
            static[name] = state[name].new_zeros(batch, chunk_size, self.key_dim, dtype=dtype)
            static[name][:, :pending] = state[name]
        return static

    def step(self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, static: dict[str, Tensor],
             position: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        index = position.remainder(chunk_size).view(1)
        static["pending_k"].index_copy_(1, index, k.to(static["pending_k"].dtype))
        static["pending_v"].index_copy_(1, index, v.to(static["pending_v"].dtype))
        return self.read_step(q, static, index, chunk_size), static

    def eager_state(self, static: dict[str, Tensor], pending: int) -> dict[str, Tensor]:
        return {**self.eager_memory(static), **{name: static[name][:, :pending].clone() for name in PENDING}}


_BASES = {"layers": Block, "recurrences": Recurrence, "memories": Memory}


@functools.cache
def with_defaults(cls: type, group: str) -> type:
    """``cls`` itself if it subclasses its ``group``'s contract (``"layers"``,
    ``"recurrences"`` or ``"memories"``), else a class derived from ``cls`` and the contract:
    ``cls``'s own attributes first, the contract's defaults for the rest. Same name, same
    parameters; ``isinstance(x, cls)`` holds."""
    base = _BASES[group]
    if issubclass(cls, base):
        return cls
    return type(cls.__name__, (cls, base), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                            "__doc__": cls.__doc__})

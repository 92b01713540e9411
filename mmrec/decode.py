"""Static decoding: a single-token step with fixed shapes, replayed as a CUDA graph.

Eager decoding (``model(token, state=s)``) launches every kernel from Python, and MM-Rec's
pending chunk grows token by token, so on a GPU each step is bound by launch overhead
rather than by its work. ``StaticDecoder`` keeps the state in preallocated buffers that
every step updates in place, with the position in a device tensor:

- MM-Rec: per layer the recurrence's ``h``, the memory, the chunk in progress at its full
  size ``[B, chunk_size, banks*dim]`` and the keys and values the memory read attends
  over, which change only when a chunk completes (``HDSMemory.step``). The step that
  completes a chunk also writes it to the memory and recomputes those keys and values
  (``HDSMemory.complete_chunk``): the host counts the tokens, so it knows which steps
  those are, and replays a second CUDA graph for them;
- Transformer: a KV cache of the maximum length, written at the position, attended over
  in full with the entries past the position masked, as gpt-fast does.

Each block provides its static form through the methods of :class:`mmrec.contracts.Block`:
``supports_static()``, ``static_state(layer, *, batch, position, max_length, kv_splits,
donate)`` (buffers that continue an eager state), ``static_capacity(buffers)`` (the most
tokens they hold, or ``None``), ``eager_state(buffers, length)``, and, for a block that
writes a memory once per chunk, ``chunk_size`` and ``complete_chunk(buffers)``; a block's
``forward`` given a ``position`` tensor is the step. The decoder names no architecture.

A step then never changes shape nor waits for the host, and on CUDA it is captured once
in a CUDA graph (``torch.cuda.CUDAGraph``) and replayed per token. ``compile=True``
compiles each block's step with ``torch.compile`` (fusing its small kernels) before the
capture. On CPU the same step runs without a graph, which is how the tests check it
against the eager path. ::

    decoder = StaticDecoder(model, model(prompt).state, max_length=4096)
    logits = decoder.step(next_token)   # [B, vocab]: a buffer that the next step overwrites
    state = decoder.state()             # an ordinary State: continue eagerly, or save it
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmrec.contracts import Block
from mmrec.state import State, map_tensors

__all__ = ["StaticDecoder", "supports_static"]


def supports_static(model) -> bool:
    """Whether every block of ``model`` is a :class:`mmrec.contracts.Block` with a static
    decode step (its ``supports_static()``: the built-in architectures; an MM-Rec block
    only with a memory that has one, such as ``hds``), and the model is not sharded: a
    sharded model gathers its weights in forward hooks, with collectives that have no
    place in a captured step."""
    blocks = getattr(model, "blocks", None)  # a LanguageModel's
    if blocks is None or _sharded(model):
        return False
    return all(isinstance(block, Block) and block.supports_static() for block in blocks)


def _sharded(model) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class StaticDecoder:
    """Single-token decode steps of ``model`` continuing ``state``, in static buffers.

    ``max_length``: the most tokens (context included) a Transformer's cache must hold;
    MM-Rec needs none. ``cuda_graph``: capture the steps in CUDA graphs (default: on a
    CUDA model). ``compile``: run each block's step through ``torch.compile`` (``True``,
    or the name of a ``torch.compile`` mode without CUDA graphs of its own, such as
    ``"max-autotune-no-cudagraphs"``). ``kv_splits > 0``: a Transformer attends by
    split-KV matmuls instead of SDPA (see ``mmrec.layers.attention.split_kv_attention``).
    ``donate_state``: a Transformer's caches that already have room for ``max_length``
    tokens become the decoder's buffers instead of being copied (at 32K tokens and batch 8
    a copy would need a second 48 GiB); ``state`` must not be used afterwards.
    """

    def __init__(self, model, state: State, max_length: int | None = None, cuda_graph: bool | None = None,
                 kv_splits: int = 0, compile: bool | str = False, donate_state: bool = False):
        if not supports_static(model):
            raise ValueError("no static decode step for this model: a block has none (an MM-Rec block needs a memory "
                             "with the static-decode methods of mmrec.contracts.Memory), or the model is sharded; "
                             "mmrec.generate decodes it with eager steps")
        state.check_compatible(model.config_json)
        self.model = model
        self.length = state.position  # on the host, so that no step has to ask the device
        self.layers = [block.static_state(layer, batch=state.batch_size, position=state.position, max_length=max_length,
                                          kv_splits=kv_splits, donate=donate_state)
                       for block, layer in zip(model.blocks, state.layers)]
        # the most tokens the buffers hold (a KV cache), or None; the chunk a block completes
        capacities = [c for block, layer in zip(model.blocks, self.layers) if (c := block.static_capacity(layer)) is not None]
        self.capacity = min(capacities, default=None)
        chunks = {block.chunk_size for block in model.blocks if block.chunk_size is not None}
        if len(chunks) > 1:
            raise ValueError(f"the blocks complete chunks of different sizes ({sorted(chunks)}), which one decoder cannot step")
        self.chunk_size = chunks.pop() if chunks else None
        device = model.embed.weight.device
        self.position = torch.tensor(state.position, device=device)  # int64, advanced by every step
        self.token = torch.zeros(state.batch_size, 1, dtype=torch.long, device=device)  # the step's input
        if compile:
            # one block's step, compiled once per distinct layer config and reused by every layer of it
            self._block_step = torch.compile(_block_step, mode=None if compile is True else compile)
        else:
            self._block_step = _block_step
        self.graphs, self.logits = {}, {}  # keyed by whether the step completes a chunk
        if device.type == "cuda" if cuda_graph is None else cuda_graph:
            self._capture()

    def _completes_chunk(self) -> bool:
        """Whether the next step is the last token of a memory chunk."""
        return self.chunk_size is not None and (self.length + 1) % self.chunk_size == 0

    @torch.no_grad()
    def _step(self, complete: bool) -> Tensor:
        """The step itself: ``self.token`` ``[B, 1]`` -> logits ``[B, vocab]``, state in place;
        ``complete``: the token is the last of a chunk, which is then written to the memory."""
        x = self.model.embed(self.token)
        for block, layer in zip(self.model.blocks, self.layers):
            x = self._block_step(block, x, layer, self.position)
        if complete:  # after every layer has read the memory before this chunk
            for block, layer in zip(self.model.blocks, self.layers):
                block.complete_chunk(layer)
        self.position += 1
        return self.model.head(self.model.norm(x))[:, -1]

    def _capture(self) -> None:
        variants = (False, True) if self.chunk_size is not None else (False,)
        # A KV cache's warm-up steps only write entries past the position, masked until real
        # steps overwrite them: restoring the position undoes them, with no copy of the
        # cache (which can be most of the GPU's memory).
        kv_cache = self.capacity is not None
        snapshot, position = [] if kv_cache else [map_tensors(layer, _clone) for layer in self.layers], self.position.clone()
        # warm up on a side stream (compiles, cuBLAS picks its kernels), as the PyTorch
        # docs prescribe, then undo what the warm-up steps did to the state
        device = self.position.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                for complete in variants:
                    self._step(complete)
        torch.cuda.current_stream(device).wait_stream(stream)
        for layer, saved in zip(self.layers, snapshot):
            _write_back(layer, saved)
        self.position.copy_(position)
        pool = None  # the graphs never run at once, so they share one memory pool
        for complete in variants:
            self.graphs[complete] = graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[complete] = self._step(complete)
            pool = graph.pool()

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The CUDA graph of an ordinary step (``None`` without CUDA graphs)."""
        return self.graphs.get(False)

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed ``token`` ``[B, 1]``; returns the next logits ``[B, vocab]`` (with a CUDA graph,
        a buffer that the next step overwrites: copy what must be kept)."""
        if self.capacity is not None and self.length >= self.capacity:
            raise ValueError(f"the static KV cache is full ({self.capacity} tokens): make the decoder with a larger max_length")
        self.token.copy_(token)
        complete = self._completes_chunk()
        if self.graphs:
            self.graphs[complete].replay()
            logits = self.logits[complete]
        else:
            logits = self._step(complete)
        self.length += 1
        return logits

    def state(self) -> State:
        """The state after the steps so far, as the eager path gives it (a copy)."""
        layers = [block.eager_state(layer, self.length) for block, layer in zip(self.model.blocks, self.layers)]
        return State(layers, self.length, self.model.config_json)

    def nbytes(self) -> int:
        """Bytes of the static state buffers."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.layers))


def _block_step(block, x: Tensor, layer: dict, position: Tensor) -> Tensor:
    """One block's static step: ``x`` ``[B, 1, d]`` -> ``[B, 1, d]``, ``layer``'s buffers in place."""
    x, new, _ = block(x, layer, False, position)
    _write_back(layer, new)
    return x


def _clone(value):
    return value.clone() if isinstance(value, Tensor) else value


def _tensors(tree):
    for value in (tree.values() if isinstance(tree, dict) else tree):
        if isinstance(value, (dict, list)):
            yield from _tensors(value)
        elif isinstance(value, Tensor):
            yield value


def _write_back(buffers: dict, new: dict) -> None:
    """Copy the tensors of ``new`` that are not already ``buffers``' own into them."""
    for key, value in new.items():
        if value is buffers[key]:
            continue
        if isinstance(value, dict):
            _write_back(buffers[key], value)
        elif isinstance(value, Tensor):
            buffers[key].copy_(value)

"""The gated delta rule (DeltaNet, Gated DeltaNet) on a matrix state per head.

``chunk_delta_rule`` is the production path (chunked: the chunk-local products as the custom
op ``mmrec::delta_chunk_prepare``, the loop over chunks as ``mmrec::delta_chunk_scan``, each a
Triton kernel on CUDA);
``naive_delta_rule`` the token-by-token reference; ``delta_rule_step`` one decode step.
Layout ``[B, T, H, D]`` throughout, the state ``[B, H, K, V]``.
"""

import torch
from torch import Tensor

from mmrec.ops.delta_rule.chunk import chunk_delta_rule
from mmrec.ops.delta_rule.naive import delta_rule_step, naive_delta_rule
from mmrec.ops.linear_scan import accumulation_dtype

__all__ = ["check_chunk", "chunk_delta_rule", "chunk_delta_rule_flops", "delta_rule", "delta_rule_step", "naive_delta_rule"]


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, state: Tensor | None = None,
               chunk_size: int = 64, intermediates: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule over any number of tokens, as layers call it: one token (a decode
    step) runs the recurrence itself, longer inputs the chunked form. Arguments as
    :func:`chunk_delta_rule` (``intermediates`` applies to the chunked form); returns ``o``
    in ``v``'s dtype and the state in the accumulation dtype."""
    if q.shape[1] > 1:
        return chunk_delta_rule(q, k, v, beta, log_alpha, state, chunk_size=chunk_size, intermediates=intermediates)
    batch, _, heads, key_dim = k.shape
    acc = accumulation_dtype(v.dtype)
    state = v.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=acc) if state is None else state.to(acc)
    o, state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], log_alpha[:, 0], state)
    return o[:, None].to(v.dtype), state


# The Triton chunk scan holds a chunk's [chunk, head_dim] operands on chip, each side padded as
# its pick_config pads them: 64 x 128 runs on an H200; 128 x 128 asked for 272 KiB of shared
# memory, past its 227
MAX_CHUNK_TILE = 64 * 128


def _tile_side(n: int) -> int:
    """A power of two of at least 16 (tl.dot's smallest tile), as pick_config's BLOCK_C and BLOCK_K."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def check_chunk(chunk: int, head_dim: int, field: str, width: str = "head width") -> None:
    """Refuse, at recipe time, a chunk whose tile the Triton chunk scan cannot hold
    (``head_dim``: the wider of a head's keys and values, named by ``width``)."""
    if _tile_side(chunk) * _tile_side(head_dim) > MAX_CHUNK_TILE:
        largest = MAX_CHUNK_TILE // _tile_side(head_dim)
        fix = (f"use a chunk of at most {largest}" if largest >= 16 else
               f"a {width} of {head_dim} is too wide even for 16-token chunks: use narrower heads")
        raise ValueError(f"{field} {chunk} at {width} {head_dim}: the chunk scan kernel holds a "
                         f"[chunk, head width] tile of at most {MAX_CHUNK_TILE} elements (64 x 128); {fix}")


def chunk_delta_rule_flops(chunk: int, heads: int, key_dim: int, value_dim: int | None = None) -> float:
    """Training FLOPs per token of :func:`chunk_delta_rule` (forward and backward, 3 x the
    forward's 2 per multiply-add): per head, within a chunk of ``C`` tokens, K Kᵀ, Q Kᵀ,
    (I + A)⁻¹ applied to K and to V, and P U (``C (3 K + 2 V)`` multiply-adds), and against
    the carried state W2 S, Q S and the state update (``3 K V``)."""
    value_dim = value_dim or key_dim
    return 3 * heads * (2 * chunk * (3 * key_dim + 2 * value_dim) + 6 * key_dim * value_dim)

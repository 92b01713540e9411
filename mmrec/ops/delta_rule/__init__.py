"""The gated delta rule (DeltaNet, Gated DeltaNet) on a matrix state per head.

``chunk_delta_rule`` is the production path (chunked: matrix products in PyTorch, and the
loop over chunks as the custom op ``mmrec::delta_chunk_scan``, a Triton kernel on CUDA);
``naive_delta_rule`` the token-by-token reference; ``delta_rule_step`` one decode step.
Layout ``[B, T, H, D]`` throughout, the state ``[B, H, K, V]``.
"""

from mmrec.ops.delta_rule.chunk import chunk_delta_rule
from mmrec.ops.delta_rule.naive import delta_rule_step, naive_delta_rule

__all__ = ["chunk_delta_rule", "chunk_delta_rule_flops", "delta_rule_step", "naive_delta_rule"]


def chunk_delta_rule_flops(chunk: int, heads: int, head_dim: int) -> float:
    """Training FLOPs per token of :func:`chunk_delta_rule` (forward and backward, 3 x the
    forward's 2 per multiply-add): per head, within a chunk of ``chunk`` tokens, K Kᵀ, Q Kᵀ,
    the triangular solve for [V | K] and the product with U (about 5 C d_h multiply-adds),
    and against the carried state W2 S, Q S and the state update (about 3 d_h²)."""
    return 3 * heads * (10 * chunk * head_dim + 6 * head_dim * head_dim)

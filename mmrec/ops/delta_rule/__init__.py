"""The gated delta rule (DeltaNet, Gated DeltaNet) on a matrix state per head.

``chunk_delta_rule`` is the production path (chunked, matrix products, pure PyTorch);
``naive_delta_rule`` the token-by-token reference; ``delta_rule_step`` one decode step.
Layout ``[B, T, H, D]`` throughout, the state ``[B, H, K, V]``.
"""

from mmrec.ops.delta_rule.chunk import chunk_delta_rule
from mmrec.ops.delta_rule.naive import delta_rule_step, naive_delta_rule

__all__ = ["chunk_delta_rule", "delta_rule_step", "naive_delta_rule"]

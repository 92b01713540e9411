"""The gated delta rule in chunks: most of the work as matrix products, in two ops.

The recurrence (``naive.py``), per head: ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``.
Split time into chunks of ``C`` tokens. Inside a chunk that starts from ``S_0``, with
``Λ_t = Σ_{s≤t} log α_s`` counted from the chunk start, the states have the form

    S_t = e^{Λ_t} S_0 + Σ_{s≤t} e^{Λ_t − Λ_s} k_s u_sᵀ

for pseudo-values ``u_s`` (induction: the step adds ``k_t u_tᵀ`` with
``u_t = β_t (v_t − α_t S_{t−1}ᵀ k_t)``). Substituting ``S_{t−1}`` into ``u_t`` gives a unit
lower-triangular system for ``U`` (rows ``u_t``)::

    (I + A) U = diag(β) V − diag(β e^{Λ}) K S_0,     A_ts = β_t e^{Λ_t − Λ_s} k_tᵀ k_s  (s < t)

so ``U = W1 − W2 S_0`` with ``W1 = (I + A)⁻¹ diag(β) V`` and ``W2 = (I + A)⁻¹ diag(β e^{Λ}) K``
(the WY / UT representation), which depend on the chunk's own tokens only. The op
``mmrec::delta_chunk_prepare`` (``chunk_prepare.py``; a Triton kernel on CUDA) computes them
for every chunk at once, with the other chunk-local terms below. What remains sequential
is a short loop over chunks carrying ``S``, the op ``mmrec::delta_chunk_scan``
(``chunk_scan.py``; a Triton kernel on CUDA)::

    U = W1 − W2 S_0
    O = diag(e^{Λ}) Q S_0 + (M ⊙ Q Kᵀ) U,             M_ts = e^{Λ_t − Λ_s}  (s ≤ t)
    S ← e^{Λ_C} S_0 + (K ⊙ e^{Λ_C − Λ})ᵀ U

Every decay factor is ``e^{Λ_t − Λ_s}`` with ``s ≤ t`` (or ``e^{Λ_t}``), at most 1, however
strong the decay. Both ops compute in the accumulation dtype (float32 for bf16/fp16,
float64 for float64), the carried state included; outputs return in ``v``'s dtype. With
``intermediates=torch.bfloat16`` the chunk's matrices ``W1 … P``, the outputs and the
stored chunk states travel between the ops in bf16, as fla's kernels keep them: half the
bytes, and the chunk loop's products bf16 products with float32 sums (the CPU loop rounds
the same operands; on the benchmark's inputs 4.1e-3 relative error against the float32
PyTorch loop where the float32 intermediates give 3.0e-3); on CUDA the preparation's
backward takes bf16 products for them too. The time axis is padded to a multiple of ``C``
with tokens that leave the state unchanged (``β = 0``, ``α = 1``). Each op has its own backward; ``torch.compile`` sees each as one node.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmrec.ops.delta_rule.chunk_prepare import delta_chunk_prepare
from mmrec.ops.delta_rule.chunk_scan import delta_chunk_scan


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor,
                     initial_state: Tensor | None = None, chunk_size: int = 64,
                     scale: float = 1.0, intermediates: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``q``, ``k`` ``[B, T, H, K]``; ``v`` ``[B, T, H, V]``; ``beta`` (in (0, 1)) and
    ``log_alpha`` (``log α``, ≤ 0) ``[B, T, H]``; ``initial_state`` ``[B, H, K, V]``;
    ``intermediates``: the dtype the chunk's matrices travel in between the ops (None: the
    accumulation dtype; ``torch.bfloat16``, with float32 accumulation: half the bytes,
    module docstring).

    Returns ``o = scale · S_tᵀ q_t`` ``[B, T, H, V]`` in ``v``'s dtype and the final state
    ``[B, H, K, V]`` in the accumulation dtype. Equals :func:`naive_delta_rule`.

    Autocast is off inside: it would run the products (the carried state's included) in bf16."""
    with torch.autocast(q.device.type, enabled=False):
        return _chunk_delta_rule(q, k, v, beta, log_alpha, initial_state, chunk_size, scale, intermediates)


def _chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor,
                      initial_state: Tensor | None, chunk_size: int, scale: float,
                      intermediates: torch.dtype | None = None,
                      prepare=delta_chunk_prepare, scan=delta_chunk_scan) -> tuple[Tensor, Tensor]:
    """``prepare`` and ``scan``: the two ops, or (tests, benchmarks) their PyTorch references
    ``chunk_prepare.chunk_prepare_reference`` and ``chunk_scan.delta_chunk_scan_reference``."""
    batch, length, heads, key_dim = k.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    if scale != 1.0:
        q = q * scale
    w1, w2, q_decayed, k_decayed, attn, chunk_decay, _ = prepare(q, k, v, beta, log_alpha, chunk_size, intermediates)
    chunks, size = w1.shape[2:4]
    acc = chunk_decay.dtype
    state = (w1.new_zeros(batch, heads, key_dim, value_dim, dtype=acc) if initial_state is None
             else initial_state.to(acc))  # [B, H, K, V]
    o, state = scan(w1, w2, q_decayed, k_decayed, attn, chunk_decay, state)[:2]  # [B, H, N, C, V], [B, H, K, V]
    o = o.movedim(1, 3).reshape(batch, chunks * size, heads, value_dim)[:, :length]
    return o.to(out_dtype), state

"""The gated delta rule in chunks: most of the work as matrix products (pure PyTorch).

The recurrence (``naive.py``), per head: ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``.
Split time into chunks of ``C`` tokens. Inside a chunk that starts from ``S_0``, with
``Λ_t = Σ_{s≤t} log α_s`` counted from the chunk start, the states have the form

    S_t = e^{Λ_t} S_0 + Σ_{s≤t} e^{Λ_t − Λ_s} k_s u_sᵀ

for pseudo-values ``u_s`` (induction: the step adds ``k_t u_tᵀ`` with
``u_t = β_t (v_t − α_t S_{t−1}ᵀ k_t)``). Substituting ``S_{t−1}`` into ``u_t`` gives a unit
lower-triangular system for ``U`` (rows ``u_t``)::

    (I + A) U = diag(β) V − diag(β e^{Λ}) K S_0,     A_ts = β_t e^{Λ_t − Λ_s} k_tᵀ k_s  (s < t)

so ``U = W1 − W2 S_0`` with ``W1 = (I + A)⁻¹ diag(β) V`` and ``W2 = (I + A)⁻¹ diag(β e^{Λ}) K``
(the WY / UT representation), which depend on the chunk's own tokens only: one batched
inverse of ``I + A`` (``unit_lower_inverse``) gives them for every chunk at once. What
remains sequential is a short loop over chunks carrying ``S``, the custom op
``mmrec::delta_chunk_scan`` (``chunk_scan.py``; a Triton kernel on CUDA)::

    U = W1 − W2 S_0
    O = diag(e^{Λ}) Q S_0 + (M ⊙ Q Kᵀ) U,             M_ts = e^{Λ_t − Λ_s}  (s ≤ t)
    S ← e^{Λ_C} S_0 + (K ⊙ e^{Λ_C − Λ})ᵀ U

Every decay factor is ``e^{Λ_t − Λ_s}`` with ``s ≤ t`` (or ``e^{Λ_t}``), at most 1: the
exponent is masked to ``−inf`` above the diagonal *before* ``exp``, so nothing overflows
and no ``inf · 0`` reaches the gradients, however strong the decay.

Inputs are cast to the accumulation dtype (float32 for bf16/fp16, float64 for float64)
and everything, the carried state included, is computed in it; outputs return in ``v``'s
dtype. The time axis is padded to a multiple of ``C`` with tokens that leave the state
unchanged (``β = 0``, ``α = 1``). Plain autograd differentiates everything but the
chunk loop, whose op has its own backward (a reverse loop over chunks); ``torch.compile``
sees the op as one node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrec.ops.delta_rule.chunk_scan import delta_chunk_scan
from mmrec.ops.linear_scan import accumulation_dtype


class UnitLowerInverse(torch.autograd.Function):
    """``(I + A)⁻¹`` for the strictly lower part of ``A`` ``[..., C, C]`` (the rest is not read).

    The inverse and then matrix products cost less than solving for the ``K + V`` right-hand
    sides: a batched triangular solve runs on ``C`` columns instead of ``K + V``, and the
    backward needs no solve at all, since ``d(X⁻¹) = −X⁻¹ dX X⁻¹``."""

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        inverse = torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (inverse,) = ctx.saved_tensors
        transposed = inverse.transpose(-1, -2)
        with torch.autocast(grad.device.type, enabled=False):  # as around the forward (chunk_delta_rule)
            return -(transposed @ grad.to(inverse.dtype) @ transposed).tril(-1)


def unit_lower_inverse(a: Tensor) -> Tensor:
    """``(I + tril(A, −1))⁻¹`` ``[..., C, C]``, unit lower-triangular, with a solve-free backward."""
    return UnitLowerInverse.apply(a)


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor,
                     initial_state: Tensor | None = None, chunk_size: int = 64,
                     scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``q``, ``k`` ``[B, T, H, K]``; ``v`` ``[B, T, H, V]``; ``beta`` (in (0, 1)) and
    ``log_alpha`` (``log α``, ≤ 0) ``[B, T, H]``; ``initial_state`` ``[B, H, K, V]``.

    Returns ``o = scale · S_tᵀ q_t`` ``[B, T, H, V]`` in ``v``'s dtype and the final state
    ``[B, H, K, V]`` in the accumulation dtype. Equals :func:`naive_delta_rule`.

    Autocast is off inside: it would run the products (the carried state's included) in bf16."""
    with torch.autocast(q.device.type, enabled=False):
        return _chunk_delta_rule(q, k, v, beta, log_alpha, initial_state, chunk_size, scale)


def _chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor,
                      initial_state: Tensor | None, chunk_size: int, scale: float,
                      scan=delta_chunk_scan) -> tuple[Tensor, Tensor]:
    """``scan``: the loop over chunks, the op or (tests, benchmarks)
    ``chunk_scan.delta_chunk_scan_reference``."""
    batch, length, heads, key_dim = k.shape
    value_dim, out_dtype = v.shape[-1], v.dtype
    acc = accumulation_dtype(v.dtype)
    size = min(chunk_size, length)  # a short input (a decode step) is one short chunk
    chunks = -(-length // size)
    pad = chunks * size - length

    def to_chunks(x: Tensor) -> Tensor:
        """``[B, T, H, ...]`` -> ``[B, H, N, C, ...]`` in ``acc``, zero-padded in time."""
        x = x.to(acc)
        if pad:
            x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])
        x = x.reshape(batch, chunks, size, heads, *x.shape[3:])
        return x.movedim(3, 1)

    q, k, v = to_chunks(q) * scale, to_chunks(k), to_chunks(v)  # [B, H, N, C, K|V]
    beta, log_alpha = to_chunks(beta), to_chunks(log_alpha)  # [B, H, N, C]; padding: β = 0, α = 1
    cum = log_alpha.cumsum(-1)  # Λ [B, H, N, C]

    index = torch.arange(size, device=k.device)
    diff = cum[..., :, None] - cum[..., None, :]  # Λ_t − Λ_s [B, H, N, C, C]
    causal = index[:, None] >= index[None, :]  # s ≤ t
    # a Python -inf, not a tensor made from it: that would be a blocking host-to-device copy
    decay = diff.masked_fill(~causal, float("-inf")).exp()  # M_ts = e^{Λ_t − Λ_s} (s ≤ t), 0 above the diagonal
    A = beta[..., None] * decay * (k @ k.transpose(-1, -2))
    from_start = cum.exp()[..., None]  # e^Λ [B, H, N, C, 1]
    rhs = beta[..., None] * torch.cat([v, from_start * k], -1)  # [diag(β) V | diag(β e^Λ) K]
    w = unit_lower_inverse(A) @ rhs  # (I + A)⁻¹ read once for both
    w1, w2 = w.split([v.shape[-1], k.shape[-1]], -1)  # [B, H, N, C, V], [B, H, N, C, K]

    attn = decay * (q @ k.transpose(-1, -2))  # M ⊙ Q Kᵀ [B, H, N, C, C]
    q_decayed = q * from_start  # diag(e^Λ) Q
    k_decayed = k * (cum[..., -1:] - cum).exp()[..., None]  # K ⊙ e^{Λ_C − Λ}
    chunk_decay = cum[..., -1].exp()  # e^{Λ_C} [B, H, N]

    state = (k.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None
             else initial_state.to(acc))  # [B, H, K, V]
    o, state = scan(w1, w2, q_decayed, k_decayed, attn, chunk_decay, state)[:2]  # [B, H, N, C, V], [B, H, K, V]
    o = o.movedim(1, 3).reshape(batch, chunks * size, heads, value_dim)[:, :length]
    return o.to(out_dtype), state

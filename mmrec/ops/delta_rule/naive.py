"""The gated delta rule token by token: the reference the chunked form is checked against.

Per batch element and head, with a state ``S`` of shape ``[K, V]``::

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,        o_t = scale · S_tᵀ q_t

computed as ``S' = α_t S_{t−1}``, ``S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ``: the write first
removes what the (decayed) state already returns for ``k_t``, then stores ``v_t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmrec.ops.linear_scan import accumulation_dtype


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, state: Tensor,
                    scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """One token: ``q``, ``k`` ``[B, H, K]``; ``v`` ``[B, H, V]``; ``beta``, ``log_alpha``
    ``[B, H]``; ``state`` ``[B, H, K, V]``. Returns ``o`` ``[B, H, V]`` and the next state,
    both in ``state``'s dtype (the caller casts). Autocast is off inside, as in the chunked form."""
    with torch.autocast(state.device.type, enabled=False):
        return _step(q, k, v, beta, log_alpha, state, scale)


def _step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, state: Tensor,
          scale: float) -> tuple[Tensor, Tensor]:
    acc = state.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    beta, alpha = beta.to(acc)[..., None], log_alpha.to(acc).exp()[..., None, None]
    state = alpha * state
    error = v - torch.einsum("bhkv,bhk->bhv", state, k)  # [B, H, V]: v_t − S'ᵀ k_t
    state = state + k[..., :, None] * (beta * error)[..., None, :]
    return scale * torch.einsum("bhkv,bhk->bhv", state, q), state


def naive_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor,
                     initial_state: Tensor | None = None, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``q``, ``k`` ``[B, T, H, K]``; ``v`` ``[B, T, H, V]``; ``beta``, ``log_alpha`` ``[B, T, H]``;
    ``initial_state`` ``[B, H, K, V]`` (zeros if ``None``).

    Returns ``o`` ``[B, T, H, V]`` in ``v``'s dtype and the final state ``[B, H, K, V]`` in
    the accumulation dtype (float64 for float64 inputs, else float32)."""
    batch, length, heads, key_dim = k.shape
    acc = accumulation_dtype(v.dtype)
    state = (k.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=acc) if initial_state is None
             else initial_state.to(acc))
    outputs = []
    for t in range(length):
        o, state = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], log_alpha[:, t], state, scale)
        outputs.append(o)
    return torch.stack(outputs, 1).to(v.dtype), state

"""The sequential part of the chunked delta rule: the loop over chunks carrying the state.

``chunk.py`` reduces each chunk ``n`` (per batch element and head) to matrices that depend
on the chunk's own tokens: ``W1_n`` ``[C, V]``, ``W2_n``, ``Qd_n``, ``Kd_n`` ``[C, K]``,
``P_n`` ``[C, C]`` and the scalar decay ``g_n``. What is left is a recurrence on the
state ``S`` ``[K, V]``::

    U_n = W1_n − W2_n S_n,    O_n = Qd_n S_n + P_n U_n,    S_{n+1} = g_n S_n + Kd_nᵀ U_n

``delta_chunk_scan`` is the custom op ``mmrec::delta_chunk_scan``. It returns ``O``, the
final state and every chunk's starting state ``S_n`` (for the backward, never
differentiated; not written when no gradient is needed). In the backward only the adjoint ``dS_{n+1}`` (the gradient of the state
after chunk ``n``) is sequential; the op ``mmrec::delta_chunk_scan_backward`` runs its
reverse loop and keeps ``dU_n`` and every ``dS_{n+1}``::

    dU_n = P_nᵀ dO_n + Kd_n dS_{n+1},      dS_n = Qd_nᵀ dO_n + g_n dS_{n+1} − W2_nᵀ dU_n

Every other gradient then comes for all chunks at once, as batched products (with ``U_n``
recomputed from the stored ``S_n``)::

    dW1_n = dU_n    dW2_n = −dU_n S_nᵀ    dQd_n = dO_n S_nᵀ    dP_n = dO_n U_nᵀ
    dKd_n = U_n dS_{n+1}ᵀ                 dg_n = Σ S_n ⊙ dS_{n+1}

On CPU both loops are PyTorch (one batched matmul per product, over all batch elements and
heads); on CUDA Triton kernels (``chunk_scan_triton.py``) run each loop in one launch with
the state on chip. ``delta_chunk_scan_reference`` is the same forward loop through autograd, which
tests and benchmarks compare against. The state, ``g`` and every sum are in the
accumulation dtype (float32, or float64 in tests); the chunk's matrices ``W1`` ... ``P``
may be stored in bf16 instead (half the bytes: ``chunk.py``), and ``O``, the kept states
and their gradients then are too.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mmrec.ops.linear_scan import accumulation_dtype
from mmrec.ops.registration import Op, requires_grad


def delta_chunk_scan_reference(w1: Tensor, w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor,
                               chunk_decay: Tensor, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """``(O [B, H, N, C, V], final state [B, H, K, V])``: the forward loop, differentiable by
    autograd (which the ops' CPU implementation is too). Shapes as in :func:`delta_chunk_scan`."""
    return _forward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states=False)[:2]


def _forward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state,
                       keep_states: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The forward loop into preallocated outputs: ``(O, final state, S_n for every n)``
    (no chunk's state without ``keep_states``). With 16-bit matrices each product rounds
    its other operand (the state, ``U``) to their dtype, as the kernel's 16-bit products
    do, and sums in the accumulation dtype."""
    batch, heads, chunks, _, value_dim = w1.shape
    key_dim = w2.shape[-1]
    acc = initial_state.dtype
    rounded = _rounding_to(w1.dtype, acc)
    o = w1.new_empty(w1.shape)
    states = w1.new_empty(batch, heads, chunks if keep_states else 0, key_dim, value_dim)
    state = initial_state
    for n in range(chunks):
        if keep_states:
            states[:, :, n] = state
        w1_n, w2_n, qd_n, kd_n, p_n = (x[:, :, n].to(acc) for x in (w1, w2, q_decayed, k_decayed, attn))
        state_r = rounded(state)
        u_r = rounded(w1_n - w2_n @ state_r)  # U, as the products read it
        o[:, :, n] = qd_n @ state_r + p_n @ u_r
        state = chunk_decay[:, :, n, None, None] * state + kd_n.transpose(-1, -2) @ u_r
    return o, state.contiguous() if chunks else state.clone(memory_format=torch.contiguous_format), states


def _rounding_to(stored: torch.dtype, acc: torch.dtype):
    """``x ↦ x`` rounded to ``stored`` and back to ``acc`` where the matrices are stored in
    fewer bits than ``acc`` (what the kernel's 16-bit products do to their other operand),
    else the identity."""
    if stored == acc:
        return lambda x: x
    return lambda x: x.to(stored).to(acc)


def _adjoint_composite(w2, q_decayed, k_decayed, attn, chunk_decay, grad_o: Tensor | None,
                       grad_final: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The sequential part of the backward: ``(dU [B, H, N, C, V], dS_{n+1} for every n
    [B, H, N, K, V], dS_0)`` by the reverse loop (module docstring). It needs no state.
    ``dU`` and ``dS_{n+1}`` in ``w2``'s dtype, ``dS_0`` in the accumulation dtype."""
    batch, heads, chunks, size, key_dim = w2.shape
    value_dim = (grad_o if grad_o is not None else grad_final).shape[-1]
    acc = chunk_decay.dtype
    rounded = _rounding_to(w2.dtype, acc)  # as in the forward
    grad_state = (w2.new_zeros(batch, heads, key_dim, value_dim, dtype=acc) if grad_final is None
                  else grad_final.to(acc))  # dS
    grad_u, grad_next = [], []
    for n in range(chunks - 1, -1, -1):
        grad_next.append(grad_state)
        w2_n, qd_n, kd_n, p_n = (x[:, :, n].to(acc) for x in (w2, q_decayed, k_decayed, attn))
        do_n = None if grad_o is None else rounded(grad_o[:, :, n].to(acc))
        du = kd_n @ rounded(grad_state)  # [B, H, C, V]
        if do_n is not None:
            du = du + p_n.transpose(-1, -2) @ do_n
        grad_state = chunk_decay[:, :, n, None, None] * grad_state - w2_n.transpose(-1, -2) @ rounded(du)
        if do_n is not None:
            grad_state = grad_state + qd_n.transpose(-1, -2) @ do_n
        grad_u.append(du)
    if not chunks:
        return (w2.new_zeros(batch, heads, 0, size, value_dim), w2.new_zeros(batch, heads, 0, key_dim, value_dim),
                grad_state.clone(memory_format=torch.contiguous_format))
    return (torch.stack(grad_u[::-1], 2).to(w2.dtype), torch.stack(grad_next[::-1], 2).to(w2.dtype),
            grad_state.contiguous())


def _chunk_gradients(w1, w2, q_decayed, attn, states, grad_o: Tensor | None, grad_u, grad_next) -> tuple[Tensor, ...]:
    """Gradients ``(w1, w2, q_decayed, k_decayed, attn, chunk_decay)`` from the adjoints,
    every chunk at once (batched products that sum over ``V``), in the dtype of the stored
    matrices (``dg`` summed in float32 at least: autograd casts it to ``g``'s dtype)."""
    states_t = states.transpose(-1, -2)  # S_nᵀ [B, H, N, V, K]
    # U_n recomputed, and −dU_n S_nᵀ, with the sign and the sum inside the products (baddbmm)
    u = torch.baddbmm(w1.flatten(0, 2), w2.flatten(0, 2), states.flatten(0, 2), alpha=-1).view(w1.shape)
    grad_w2 = torch.baddbmm(w2.new_empty(w2.shape).flatten(0, 2), grad_u.flatten(0, 2), states_t.flatten(0, 2),
                            beta=0, alpha=-1).view(w2.shape)
    if grad_o is None:
        grad_qd, grad_attn = torch.zeros_like(q_decayed), torch.zeros_like(attn)
    else:
        grad_o = grad_o.contiguous()  # often a view from the layer's layout: one copy for both products
        grad_qd, grad_attn = grad_o @ states_t, grad_o @ u.transpose(-1, -2)
    grad_kd = u @ grad_next.transpose(-1, -2)
    grad_decay = (states * grad_next).sum((-2, -1), dtype=torch.promote_types(states.dtype, torch.float32))
    return grad_u, grad_w2, grad_qd, grad_kd, grad_attn, grad_decay


# ---------------------------------------------------------------------------- the ops


@functools.cache
def _triton_kernels():
    """The Triton launchers, imported on first use on a GPU; None where Triton is missing."""
    try:
        from mmrec.ops.delta_rule import chunk_scan_triton
    except ImportError:
        return None
    return chunk_scan_triton


def _use_triton(x: Tensor):
    """The Triton launchers for ``x``'s dtype, or None: float64 (tests only) runs the loop,
    whose matmuls cuBLAS does in float64."""
    return _triton_kernels() if x.dtype != torch.float64 else None


def _forward_composite_no_grad(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states=True):
    with torch.no_grad():
        return _forward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states)


def _forward_cuda(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states=True):
    kernels = _use_triton(w1)
    if kernels is None:
        return NotImplemented
    return kernels.chunk_scan_forward(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state,
                                      keep_states=keep_states)


def _forward_fake(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states=True):
    batch, heads, chunks, _, value_dim = w1.shape
    return (w1.new_empty(w1.shape), initial_state.new_empty(initial_state.shape),
            w1.new_empty(batch, heads, chunks if keep_states else 0, w2.shape[-1], value_dim))


_forward_op = Op("delta_chunk_scan(Tensor w1, Tensor w2, Tensor q_decayed, Tensor k_decayed, Tensor attn, "
                 "Tensor chunk_decay, Tensor initial_state, bool keep_states=True) -> (Tensor, Tensor, Tensor)",
                 composite=_forward_composite_no_grad, cuda=_forward_cuda, fake=_forward_fake)


def _adjoint_composite_no_grad(w2, q_decayed, k_decayed, attn, chunk_decay, grad_o, grad_final):
    """The reverse loop of ``mmrec::delta_chunk_scan``'s backward: ``(dU, dS_{n+1} for
    every n, dS_0)``, from the gradients of ``O`` and of the final state (not both None)."""
    with torch.no_grad():
        return _adjoint_composite(w2, q_decayed, k_decayed, attn, chunk_decay, grad_o, grad_final)


def _adjoint_cuda(w2, q_decayed, k_decayed, attn, chunk_decay, grad_o, grad_final):
    kernels = _use_triton(w2)
    if kernels is None:
        return NotImplemented
    return kernels.chunk_scan_adjoint(w2, q_decayed, k_decayed, attn, chunk_decay, grad_o, grad_final)


def _adjoint_fake(w2, q_decayed, k_decayed, attn, chunk_decay, grad_o, grad_final):
    batch, heads, chunks, size, key_dim = w2.shape
    value_dim = (grad_o if grad_o is not None else grad_final).shape[-1]
    return (w2.new_empty(batch, heads, chunks, size, value_dim), w2.new_empty(batch, heads, chunks, key_dim, value_dim),
            chunk_decay.new_empty(batch, heads, key_dim, value_dim))


_adjoint_op = Op("delta_chunk_scan_backward(Tensor w2, Tensor q_decayed, Tensor k_decayed, Tensor attn, "
                 "Tensor chunk_decay, Tensor? grad_o, Tensor? grad_final) -> (Tensor, Tensor, Tensor)",
                 composite=_adjoint_composite_no_grad, cuda=_adjoint_cuda, fake=_adjoint_fake)


class _DeltaChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states):
        o, final, states = _forward_op.below_autograd(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state,
                                                      keep_states)
        ctx.mark_non_differentiable(states)
        ctx.save_for_backward(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, states)
        return o, final, states

    @staticmethod
    def backward(ctx, grad_o: Tensor | None, grad_final: Tensor | None, _grad_states):
        *inputs, states = ctx.saved_tensors
        w1, w2, q_decayed, k_decayed, attn, chunk_decay, _initial_state = inputs
        if grad_o is None and grad_final is None:
            return (None,) * 8
        if states.shape[2] != w1.shape[2] and not torch.is_grad_enabled():
            raise RuntimeError("mmrec::delta_chunk_scan ran with keep_states=False, so it has no states to differentiate "
                               "with: call it through delta_chunk_scan, which keeps them when a gradient is needed")
        if torch.is_grad_enabled():
            # Double backward: the stored states are constants to autograd, so recompute them
            # (the forward loop, differentiable here), then the reverse loop the same way.
            states = _forward_composite(*inputs, keep_states=True)[2]
            grad_u, grad_next, grad_initial = _adjoint_composite(w2, q_decayed, k_decayed, attn, chunk_decay, grad_o,
                                                                 grad_final)
        else:
            # One reverse pass (a Triton kernel on CUDA).
            grad_u, grad_next, grad_initial = _adjoint_op.below_autograd(w2, q_decayed, k_decayed, attn, chunk_decay,
                                                                         grad_o, grad_final)
        return (*_chunk_gradients(w1, w2, q_decayed, attn, states, grad_o, grad_u, grad_next), grad_initial, None)


def _forward_autograd(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states=True):
    args = (w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states)
    return _DeltaChunkScan.apply(*args) if requires_grad(args) else _forward_op.below_autograd(*args)


_forward_op.differentiate(_forward_autograd)


def delta_chunk_scan(w1: Tensor, w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor, chunk_decay: Tensor,
                     initial_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run the chunk recurrence (module docstring) for every batch element and head.

    ``w1`` ``[B, H, N, C, V]``; ``w2``, ``q_decayed``, ``k_decayed`` ``[B, H, N, C, K]``;
    ``attn`` ``[B, H, N, C, C]``, these five of one dtype (float32 or float64, or bf16
    stored intermediates); ``chunk_decay`` ``[B, H, N]`` and ``initial_state``
    ``[B, H, K, V]`` in the accumulation dtype (float64 for float64, else float32). Any strides.

    Returns ``O`` ``[B, H, N, C, V]`` in ``w1``'s dtype, the final state ``[B, H, K, V]`` in
    the accumulation dtype and the state entering each chunk ``[B, H, N, K, V]`` in ``w1``'s
    dtype (not differentiable), which the backward reads: kept only when a gradient will be
    needed (``[B, H, 0, K, V]`` otherwise)."""
    if w1.dim() != 5:
        raise ValueError(f"delta_chunk_scan expects w1 of shape [batch, heads, chunks, chunk, value_dim], got {tuple(w1.shape)}")
    batch, heads, chunks, size, value_dim = w1.shape
    key_dim = w2.shape[-1] if w2.dim() == 5 else -1
    expected = {"w2": (batch, heads, chunks, size, key_dim), "q_decayed": (batch, heads, chunks, size, key_dim),
                "k_decayed": (batch, heads, chunks, size, key_dim), "attn": (batch, heads, chunks, size, size),
                "chunk_decay": (batch, heads, chunks), "initial_state": (batch, heads, key_dim, value_dim)}
    given = {"w2": w2, "q_decayed": q_decayed, "k_decayed": k_decayed, "attn": attn, "chunk_decay": chunk_decay,
             "initial_state": initial_state}
    if w1.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"delta_chunk_scan takes w1 in float32, float64 or bfloat16, got {w1.dtype}")
    acc = accumulation_dtype(w1.dtype)
    for name, x in given.items():
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"delta_chunk_scan expects {name} of shape {expected[name]} (from w1 {tuple(w1.shape)} "
                             f"and w2), got {tuple(x.shape)}")
        dtype = acc if name in ("chunk_decay", "initial_state") else w1.dtype
        if x.dtype != dtype:
            raise ValueError(f"delta_chunk_scan expects {name} in {dtype} (w1 is {w1.dtype}), got {x.dtype}: the "
                             "chunk's matrices share w1's dtype, chunk_decay and initial_state are in its accumulation dtype")
    keep_states = torch.is_grad_enabled() and any(x.requires_grad for x in (w1, *given.values()))
    return _forward_op(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, keep_states)

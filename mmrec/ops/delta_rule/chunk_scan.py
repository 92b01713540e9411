"""The sequential part of the chunked delta rule: the loop over chunks carrying the state.

``chunk.py`` reduces each chunk ``n`` (per batch element and head) to matrices that depend
on the chunk's own tokens: ``W1_n`` ``[C, V]``, ``W2_n``, ``Qd_n``, ``Kd_n`` ``[C, K]``,
``P_n`` ``[C, C]`` and the scalar decay ``g_n``. What is left is a recurrence on the
state ``S`` ``[K, V]``::

    U_n = W1_n − W2_n S_n,    O_n = Qd_n S_n + P_n U_n,    S_{n+1} = g_n S_n + Kd_nᵀ U_n

``delta_chunk_scan`` is the custom op ``mmrec::delta_chunk_scan``. It returns ``O``, the
final state and every chunk's starting state ``S_n`` (kept for the backward, never
differentiated). Its backward, the op ``mmrec::delta_chunk_scan_backward``, is the
reverse loop, with ``dS`` the gradient of ``S_{n+1}``::

    dU_n  = P_nᵀ dO_n + Kd_n dS          dW1_n = dU_n          dW2_n = −dU_n S_nᵀ
    dP_n  = dO_n U_nᵀ                    dQd_n = dO_n S_nᵀ      dKd_n = U_n dSᵀ
    dg_n  = Σ S_n ⊙ dS                   dS   ← Qd_nᵀ dO_n + g_n dS − W2_nᵀ dU_n

(``U_n`` recomputed from the stored ``S_n``). On CPU both are these loops in PyTorch
(one batched matmul per product, over all batch elements and heads); on CUDA Triton
kernels (``chunk_scan_triton.py``) run the whole loop in one launch with the state on
chip. ``delta_chunk_scan_reference`` is the same forward loop through autograd, which
tests and benchmarks compare against. Everything runs in the inputs' dtype (float32 or
float64: the caller casts to the accumulation dtype).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def delta_chunk_scan_reference(w1: Tensor, w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor,
                               chunk_decay: Tensor, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """``(O [B, H, N, C, V], final state [B, H, K, V])``, one batched step per chunk,
    differentiable by autograd. Shapes as in :func:`delta_chunk_scan`."""
    state = initial_state
    outputs = []
    for n in range(w1.shape[2]):
        u = w1[:, :, n] - w2[:, :, n] @ state  # [B, H, C, V]
        outputs.append(q_decayed[:, :, n] @ state + attn[:, :, n] @ u)
        state = chunk_decay[:, :, n, None, None] * state + k_decayed[:, :, n].transpose(-1, -2) @ u
    return torch.stack(outputs, 2), state


def _forward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state) -> tuple[Tensor, Tensor, Tensor]:
    """The forward loop into preallocated outputs: ``(O, final state, S_n for every n)``."""
    batch, heads, chunks, _, value_dim = w1.shape
    key_dim = w2.shape[-1]
    o = w1.new_empty(w1.shape)
    states = w1.new_empty(batch, heads, chunks, key_dim, value_dim)
    state = initial_state
    for n in range(chunks):
        states[:, :, n] = state
        u = w1[:, :, n] - w2[:, :, n] @ state
        o[:, :, n] = q_decayed[:, :, n] @ state + attn[:, :, n] @ u
        state = chunk_decay[:, :, n, None, None] * state + k_decayed[:, :, n].transpose(-1, -2) @ u
    return o, state.clone() if chunks == 0 else state, states


def _backward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, states, grad_o: Tensor | None,
                        grad_final: Tensor | None) -> tuple[Tensor, ...]:
    """Gradients ``(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state)`` by the
    reverse loop (module docstring). Differentiable itself when ``states`` is."""
    batch, heads, chunks, _, value_dim = w1.shape
    key_dim = w2.shape[-1]
    grad_state = (w1.new_zeros(batch, heads, key_dim, value_dim) if grad_final is None else grad_final)  # dS
    grads = {name: [] for name in ("w1", "w2", "q_decayed", "k_decayed", "attn", "chunk_decay")}
    for n in range(chunks - 1, -1, -1):
        state = states[:, :, n]  # S_n [B, H, K, V]
        state_t = state.transpose(-1, -2)
        u = w1[:, :, n] - w2[:, :, n] @ state  # U_n [B, H, C, V]
        grad_u = k_decayed[:, :, n] @ grad_state
        if grad_o is not None:
            grad_out = grad_o[:, :, n]  # dO_n [B, H, C, V]
            grad_u = grad_u + attn[:, :, n].transpose(-1, -2) @ grad_out
            grads["attn"].append(grad_out @ u.transpose(-1, -2))
            grads["q_decayed"].append(grad_out @ state_t)
        else:
            grads["attn"].append(w1.new_zeros(batch, heads, *attn.shape[-2:]))
            grads["q_decayed"].append(w1.new_zeros(batch, heads, *q_decayed.shape[-2:]))
        grads["k_decayed"].append(u @ grad_state.transpose(-1, -2))
        grads["chunk_decay"].append((state * grad_state).sum((-2, -1)))
        grads["w1"].append(grad_u)
        grads["w2"].append(-(grad_u @ state_t))
        grad_state = chunk_decay[:, :, n, None, None] * grad_state - w2[:, :, n].transpose(-1, -2) @ grad_u
        if grad_o is not None:
            grad_state = grad_state + q_decayed[:, :, n].transpose(-1, -2) @ grad_out
    out = [torch.stack(grads[name][::-1], 2) if chunks else ref.new_zeros(ref.shape)
           for name, ref in zip(grads, (w1, w2, q_decayed, k_decayed, attn, chunk_decay))]
    return (*out, grad_state.clone() if chunks == 0 and grad_final is not None else grad_state)


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
    return _triton_kernels() if x.dtype == torch.float32 else None


@torch.library.custom_op("mmrec::delta_chunk_scan", mutates_args=())
def _scan_op(w1: Tensor, w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor, chunk_decay: Tensor,
             initial_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        return _forward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state)


@_scan_op.register_fake
def _(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state):
    batch, heads, chunks, _, value_dim = w1.shape
    return (w1.new_empty(w1.shape), w1.new_empty(initial_state.shape),
            w1.new_empty(batch, heads, chunks, w2.shape[-1], value_dim))


@_scan_op.register_kernel("cuda")
def _(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state):
    kernels = _use_triton(w1)
    if kernels is None:
        with torch.no_grad():
            return _forward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state)
    return kernels.chunk_scan_forward(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state)


@torch.library.custom_op("mmrec::delta_chunk_scan_backward", mutates_args=())
def _scan_backward_op(w1: Tensor, w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor, chunk_decay: Tensor,
                      states: Tensor, grad_o: Tensor | None, grad_final: Tensor | None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state)`` of
    ``mmrec::delta_chunk_scan``, from its stored ``states``."""
    with torch.no_grad():
        return _backward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, states, grad_o, grad_final)


@_scan_backward_op.register_fake
def _(w1, w2, q_decayed, k_decayed, attn, chunk_decay, states, grad_o, grad_final):
    batch, heads, _, key_dim, value_dim = states.shape
    return (*(x.new_empty(x.shape) for x in (w1, w2, q_decayed, k_decayed, attn, chunk_decay)),
            w1.new_empty(batch, heads, key_dim, value_dim))


@_scan_backward_op.register_kernel("cuda")
def _(w1, w2, q_decayed, k_decayed, attn, chunk_decay, states, grad_o, grad_final):
    kernels = _use_triton(w1)
    if kernels is None:
        with torch.no_grad():
            return _backward_composite(w1, w2, q_decayed, k_decayed, attn, chunk_decay, states, grad_o, grad_final)
    return kernels.chunk_scan_backward(w1, w2, q_decayed, k_decayed, attn, chunk_decay, states, grad_o, grad_final)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(*inputs, output[2])


def _backward(ctx, grad_o: Tensor | None, grad_final: Tensor | None, _grad_states):
    *inputs, states = ctx.saved_tensors
    if torch.is_grad_enabled():
        # Double backward: the stored states are constants to autograd, so recompute them
        # through differentiable ops, then run the same reverse loop.
        w1, w2, _, k_decayed, _, chunk_decay, initial_state = inputs
        chunks = w1.shape[2]
        states, state = [], initial_state
        for n in range(chunks):
            states.append(state)
            u = w1[:, :, n] - w2[:, :, n] @ state
            state = chunk_decay[:, :, n, None, None] * state + k_decayed[:, :, n].transpose(-1, -2) @ u
        states = torch.stack(states, 2) if chunks else w1.new_empty(*w1.shape[:3], w2.shape[-1], w1.shape[-1])
        return _backward_composite(*inputs[:6], states, grad_o, grad_final)
    # One reverse pass (a Triton kernel on CUDA).
    return torch.ops.mmrec.delta_chunk_scan_backward(*inputs[:6], states, grad_o, grad_final)


_scan_op.register_autograd(_backward, setup_context=_setup_context)


def delta_chunk_scan(w1: Tensor, w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor, chunk_decay: Tensor,
                     initial_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run the chunk recurrence (module docstring) for every batch element and head.

    ``w1`` ``[B, H, N, C, V]``; ``w2``, ``q_decayed``, ``k_decayed`` ``[B, H, N, C, K]``;
    ``attn`` ``[B, H, N, C, C]``; ``chunk_decay`` ``[B, H, N]``; ``initial_state``
    ``[B, H, K, V]``; all of one dtype, float32 or float64. Any strides.

    Returns ``O`` ``[B, H, N, C, V]``, the final state ``[B, H, K, V]`` and the state
    entering each chunk ``[B, H, N, K, V]`` (not differentiable)."""
    if w1.dim() != 5:
        raise ValueError(f"delta_chunk_scan expects w1 of shape [batch, heads, chunks, chunk, value_dim], got {tuple(w1.shape)}")
    batch, heads, chunks, size, value_dim = w1.shape
    key_dim = w2.shape[-1] if w2.dim() == 5 else -1
    expected = {"w2": (batch, heads, chunks, size, key_dim), "q_decayed": (batch, heads, chunks, size, key_dim),
                "k_decayed": (batch, heads, chunks, size, key_dim), "attn": (batch, heads, chunks, size, size),
                "chunk_decay": (batch, heads, chunks), "initial_state": (batch, heads, key_dim, value_dim)}
    given = {"w2": w2, "q_decayed": q_decayed, "k_decayed": k_decayed, "attn": attn, "chunk_decay": chunk_decay,
             "initial_state": initial_state}
    for name, x in given.items():
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"delta_chunk_scan expects {name} of shape {expected[name]} (from w1 {tuple(w1.shape)} "
                             f"and w2), got {tuple(x.shape)}")
        if x.dtype != w1.dtype:
            raise ValueError(f"delta_chunk_scan expects every input in w1's dtype {w1.dtype}; {name} is {x.dtype}: "
                             "cast to the accumulation dtype first")
    if w1.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"delta_chunk_scan runs in float32 or float64, got {w1.dtype}: cast to the accumulation dtype first")
    return torch.ops.mmrec.delta_chunk_scan(w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state)

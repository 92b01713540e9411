"""The seeds' nonlinear recurrence ``h_t = z_t ⊙ σ(W_g h_{t-1}) + γ_t ⊙ h_{t-1}``.

``W_g`` is block-diagonal, one ``[head_dim, head_dim]`` block per head, applied to the
state as a row vector (``h_row @ W`` per head). The state sits inside the gate, so this
cannot be a scan: it runs step by step.

``gated_rnn`` is the custom op ``mmrec::gated_rnn``. Its CPU implementation is the step
loop written with plain tensor ops (no autograd graph); its backward is the op
``mmrec::gated_rnn_backward``, backpropagation through time as one reverse loop that
recomputes each step's gate from the stored states instead of keeping the gates. On CUDA
both ops run Triton kernels (``mmrec.ops.gated_rnn_triton``) that keep a head's ``W_g``
block and its state on chip for the whole sequence. ``gated_rnn_reference`` is the
autograd-traced loop that tests compare against.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange
from torch import Tensor

from mmrec.ops.linear_scan import accumulation_dtype
from mmrec.ops.registration import Op, requires_grad

MAX_TRITON_HEAD_DIM = 128  # a head's W_g block [E, E] is kept in registers up to this size


def gated_rnn_reference(z: Tensor, log_decay: Tensor, weight: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``z``, ``log_decay``: ``[B, T, H*E]``; ``weight``: ``[H, E, E]``; ``h0``: ``[B, H*E]``.

    Returns ``(h [B, T, H*E], h_last [B, H*E])`` in the dtype of ``log_decay``.
    """
    n_heads, head_dim, _ = weight.shape
    acc = log_decay.dtype
    z = rearrange(z.to(acc), "b t (h e) -> b t h e", h=n_heads)
    decay = rearrange(log_decay.exp(), "b t (h e) -> b t h e", h=n_heads)
    weight = weight.to(acc)
    h = z.new_zeros(z.shape[0], n_heads, head_dim) if h0 is None else rearrange(h0.to(acc), "b (h e) -> b h e", h=n_heads)
    states = []
    for t in range(z.shape[1]):
        gate = torch.sigmoid(torch.einsum("bhi,hij->bhj", h, weight))
        h = z[:, t] * gate + decay[:, t] * h
        states.append(h)
    out = torch.stack(states, dim=1)
    return rearrange(out, "b t h e -> b t (h e)"), rearrange(h, "b h e -> b (h e)")


# ------------------------------------------------------------------------ composites
# Written per head as [B, H, E] views of the [B, T, H*E] tensors. The state is a row
# vector per head; ``_matvec(h, W)`` is ``h @ W`` per head, ``_matvec_t(g, W)`` is
# ``g @ W^T``, both as one batched matmul over heads.


def _heads(x: Tensor, n_heads: int) -> Tensor:
    return x.unflatten(-1, (n_heads, -1))


def _matvec(h: Tensor, weight: Tensor) -> Tensor:
    """``[B, H, E] x [H, E, E] -> [B, H, E]``: ``h_row @ W`` per head."""
    return torch.bmm(h.transpose(0, 1), weight).transpose(0, 1)


def _matvec_t(g: Tensor, weight: Tensor) -> Tensor:
    """``g_row @ W^T`` per head."""
    return torch.bmm(g.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)


def _forward_composite(z: Tensor, log_decay: Tensor, weight: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    batch, length, dim = log_decay.shape
    n_heads = weight.shape[0]
    acc = accumulation_dtype(log_decay.dtype)
    w = weight.to(acc)
    h = log_decay.new_zeros(batch, n_heads, dim // n_heads, dtype=acc) if h0 is None else _heads(h0.to(acc), n_heads)
    out = torch.empty(batch, length, dim, dtype=log_decay.dtype, device=log_decay.device)
    out_heads = _heads(out, n_heads)
    z_heads, ld_heads = _heads(z, n_heads), _heads(log_decay, n_heads)
    for t in range(length):
        gate = torch.sigmoid(_matvec(h, w))
        h = torch.addcmul(ld_heads[:, t].to(acc).exp() * h, z_heads[:, t].to(acc), gate)
        out_heads[:, t] = h
    h_last = h.flatten(1).to(log_decay.dtype)
    return out, (h_last.clone() if length == 0 else h_last)  # never an alias of h0


def _backward_composite(
    z: Tensor, log_decay: Tensor, weight: Tensor, h0: Tensor | None, h: Tensor, grad_h: Tensor | None, grad_h_last: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backpropagation through time; differentiable itself (double backward).

    With ``a_t = h_{t-1} W``, ``s_t = σ(a_t)`` and ``g_t = dL/dh_t`` (all paths):
    ``dz_t = g_t s_t``, ``dlogγ_t = g_t γ_t h_{t-1}``, ``da_t = g_t z_t s_t (1 - s_t)``,
    ``dW = Σ_t h_{t-1}^T da_t`` and ``g_{t-1} = grad_h_{t-1} + g_t γ_t + da_t W^T``;
    ``dh0`` is the adjoint left over before the first step.
    """
    batch, length, dim = h.shape
    n_heads = weight.shape[0]
    acc = accumulation_dtype(log_decay.dtype)
    w = weight.to(acc)
    z_heads, ld_heads, h_heads = _heads(z, n_heads), _heads(log_decay, n_heads), _heads(h, n_heads)
    gh_heads = None if grad_h is None else _heads(grad_h, n_heads)
    h_init = None if h0 is None else _heads(h0.to(acc), n_heads)
    g = h.new_zeros(batch, n_heads, dim // n_heads, dtype=acc) if grad_h_last is None else _heads(grad_h_last.to(acc), n_heads)
    grad_z = torch.empty(batch, length, dim, dtype=z.dtype, device=h.device)
    grad_ld = torch.empty(batch, length, dim, dtype=log_decay.dtype, device=h.device)
    grad_a = torch.empty(batch, length, dim, dtype=acc, device=h.device)  # dL/d(pre-activation), for dW
    gz_heads, gld_heads, ga_heads = _heads(grad_z, n_heads), _heads(grad_ld, n_heads), _heads(grad_a, n_heads)
    for t in range(length - 1, -1, -1):
        if gh_heads is not None:
            g = g + gh_heads[:, t].to(acc)
        if t > 0:
            h_prev = h_heads[:, t - 1].to(acc)
        else:
            h_prev = torch.zeros_like(g) if h_init is None else h_init
        gate = torch.sigmoid(_matvec(h_prev, w))
        decay = ld_heads[:, t].to(acc).exp()
        dz = g * gate
        gz_heads[:, t] = dz
        gld_heads[:, t] = g * decay * h_prev
        da = dz * z_heads[:, t].to(acc) * (1 - gate)
        ga_heads[:, t] = da
        g = torch.addcmul(_matvec_t(da, w), g, decay)
    # dW = Σ_{b,t} h_{t-1}^T da_t in one contraction (h_{-1} = h0; zero without it)
    grad_w = torch.einsum("bthi,bthj->hij", h_heads[:, :-1].to(acc), ga_heads[:, 1:])
    if h_init is not None and length > 0:
        grad_w = grad_w + torch.einsum("bhi,bhj->hij", h_init, ga_heads[:, 0])
    grad_h0 = h.new_empty(0) if h0 is None else g.flatten(1).to(h0.dtype)
    if length == 0 and h0 is not None:
        grad_h0 = grad_h0.clone()  # never an alias of grad_h_last
    return grad_z, grad_ld, grad_w.to(weight.dtype), grad_h0


# ---------------------------------------------------------------------------- the ops


@functools.cache
def _triton_kernels():
    """The Triton launchers, imported on first use on a GPU; None where Triton is missing."""
    try:
        from mmrec.ops import gated_rnn_triton
    except ImportError:
        return None
    return gated_rnn_triton


def _use_triton(weight: Tensor):
    kernels = _triton_kernels()
    return kernels if kernels is not None and weight.shape[-1] <= MAX_TRITON_HEAD_DIM else None


def _forward_composite_no_grad(z, log_decay, weight, h0=None):
    with torch.no_grad():
        return _forward_composite(z, log_decay, weight, h0)


def _forward_cuda(z, log_decay, weight, h0=None):
    kernels = _use_triton(weight)
    if kernels is None:
        return NotImplemented
    return kernels.gated_rnn_forward(z, log_decay, weight, h0)


def _forward_fake(z, log_decay, weight, h0=None):
    batch, _, dim = log_decay.shape
    return log_decay.new_empty(log_decay.shape), log_decay.new_empty((batch, dim))


_forward_op = Op("gated_rnn(Tensor z, Tensor log_decay, Tensor weight, Tensor? h0=None) -> (Tensor, Tensor)",
                 composite=_forward_composite_no_grad, cuda=_forward_cuda, fake=_forward_fake)


def _backward_composite_no_grad(z, log_decay, weight, h0, h, grad_h, grad_h_last):
    """Gradients ``(z, log_decay, weight, h0)`` of ``mmrec::gated_rnn``; the last is empty without ``h0``."""
    with torch.no_grad():
        return _backward_composite(z, log_decay, weight, h0, h, grad_h, grad_h_last)


def _backward_cuda(z, log_decay, weight, h0, h, grad_h, grad_h_last):
    kernels = _use_triton(weight)
    if kernels is None:
        return NotImplemented
    return kernels.gated_rnn_backward(z, log_decay, weight, h0, h, grad_h, grad_h_last)


def _backward_fake(z, log_decay, weight, h0, h, grad_h, grad_h_last):
    grad_h0 = h.new_empty(0) if h0 is None else h0.new_empty(h0.shape)
    return z.new_empty(h.shape), log_decay.new_empty(h.shape), weight.new_empty(weight.shape), grad_h0


_backward_op = Op("gated_rnn_backward(Tensor z, Tensor log_decay, Tensor weight, Tensor? h0, Tensor h, Tensor? grad_h, "
                  "Tensor? grad_h_last) -> (Tensor, Tensor, Tensor, Tensor)",
                  composite=_backward_composite_no_grad, cuda=_backward_cuda, fake=_backward_fake)


class _GatedRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, log_decay, weight, h0):
        h, h_last = _forward_op.below_autograd(z, log_decay, weight, h0)
        ctx.save_for_backward(z, log_decay, weight, h0, h)
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h: Tensor | None, grad_h_last: Tensor | None):
        z, log_decay, weight, h0, h = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Double backward: the same loop through differentiable ops.
            grads = _backward_composite(z, log_decay, weight, h0, h, grad_h, grad_h_last)
        else:
            # One fused reverse pass (a Triton kernel on CUDA).
            grads = _backward_op.below_autograd(z, log_decay, weight, h0, h, grad_h, grad_h_last)
        grad_z, grad_ld, grad_w, grad_h0 = grads
        return grad_z, grad_ld, grad_w, (grad_h0 if h0 is not None else None)


def _forward_autograd(z, log_decay, weight, h0=None):
    args = (z, log_decay, weight, h0)
    return _GatedRNN.apply(*args) if requires_grad(args) else _forward_op.below_autograd(*args)


_forward_op.differentiate(_forward_autograd)


def gated_rnn(z: Tensor, log_decay: Tensor, weight: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run ``h_t = z_t ⊙ σ(h_{t-1} W) + exp(log_decay_t) ⊙ h_{t-1}`` per head along dim 1.

    ``z``, ``log_decay``: ``[B, T, H*E]``; ``weight``: ``[H, E, E]`` (``W_g``, one block
    per head); ``h0``: ``[B, H*E]``, the state before the first step (zeros when None).
    Returns ``(h [B, T, H*E], h_last [B, H*E])`` in the dtype of ``log_decay``; the state
    is carried in float32 (float64 for a float64 ``log_decay``).
    """
    if z.dim() != 3 or z.shape != log_decay.shape:
        raise ValueError(f"gated_rnn expects z and log_decay of the same [batch, time, dim] shape, got {tuple(z.shape)} and {tuple(log_decay.shape)}")
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2] or weight.shape[0] * weight.shape[1] != z.shape[2]:
        raise ValueError(f"gated_rnn expects weight of shape [heads, head_dim, head_dim] with heads * head_dim = {z.shape[2]}, got {tuple(weight.shape)}")
    if h0 is not None and h0.shape != (z.shape[0], z.shape[2]):
        raise ValueError(f"gated_rnn expects h0 of shape {(z.shape[0], z.shape[2])}, got {tuple(h0.shape)}")
    return _forward_op(z, log_decay, weight, h0)

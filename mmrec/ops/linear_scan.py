"""First-order linear recurrence ``h_t = a_t * h_{t-1} + b_t`` over the time axis.

``linear_scan`` is the custom op ``mmrec::linear_scan``. Its CPU implementation,
``linear_scan_composite`` (and ``linear_scan_backward_composite`` for the backward op), is
a chunked parallel scan in PyTorch ops (log-depth doubling inside chunks of ``CHUNK``
steps, the same scan recursively over chunk totals), so it never loops over tokens in
Python and needs no logarithms: ``a`` may have any sign; it runs on any device, which is
how the scan benchmark times it on the GPU as a baseline. ``linear_scan_reference`` is the
step-by-step loop that tests compare against. GPU kernels register further
implementations of the same op.

Two options run through both ops (forward and backward) on every device:

* ``log_space``: the first input is ``log a`` and ``a = exp(log a)`` is formed in the
  accumulation dtype, never stored. A decay close to 1 keeps its precision (``exp(-1e-3)``
  rounds to 1 in bf16, ``-1e-3`` does not) and one close to 0 never underflows in the
  input dtype; ``exp`` underflowing to 0 in fp32 is harmless, since ``a`` only ever
  multiplies (nothing divides by it). The gradient is the one of ``log a``:
  ``g_t h_{t-1} a_t``.
* ``accumulate_fp64``: carry the state (and the adjoint) in float64 whatever the input
  dtype; outputs keep the input dtype. For accuracy tests (the seeds' "DPG").
* ``out_dtype``: the dtype ``h`` is stored in (default: the inputs'). The state is still
  accumulated in the accumulation dtype, and ``h_last`` is then returned in it, so a
  sequence fed in pieces carries its state at full precision. A bf16 ``h`` halves what
  the forward writes and what autograd keeps for backward; the backward reads it only
  for ``grad_a = g_t h_{t-1}``, whose relative error is then bf16's (2^-8).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mmrec.ops.registration import Op, requires_grad

CHUNK = 64


def linear_scan_reference(
    a: Tensor, b: Tensor, h0: Tensor | None = None, reverse: bool = False, *, log_space: bool = False
) -> tuple[Tensor, Tensor]:
    """Step-by-step loop over time; ``a``, ``b``: ``[B, T, D]``, ``h0``: ``[B, D]``."""
    if log_space:
        a = a.exp()
    steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)
    out = torch.empty_like(b)
    for t in steps:
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out, h


def accumulation_dtype(dtype: torch.dtype, accumulate_fp64: bool = False) -> torch.dtype:
    """float64 stays float64; everything else accumulates (and keeps state) in float32,
    or float64 on request."""
    return torch.float64 if accumulate_fp64 or dtype == torch.float64 else torch.float32


def _doubling_scan(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive scan along dim -2 by doubling; returns (cumulative a, h) with h0 = 0."""
    length = a.shape[-2]
    offset = 1
    while offset < length:
        b = torch.cat([b[..., :offset, :], torch.addcmul(b[..., offset:, :], a[..., offset:, :], b[..., :-offset, :])], dim=-2)
        a = torch.cat([a[..., :offset, :], a[..., offset:, :] * a[..., :-offset, :]], dim=-2)
        offset *= 2
    return a, b


def _chunked_scan(a: Tensor, b: Tensor) -> Tensor:
    """Forward scan of ``[B, T, D]`` with h0 = 0, in O(T log CHUNK) work."""
    batch, length, dim = a.shape
    if length <= CHUNK:
        return _doubling_scan(a, b)[1]
    n_chunks = -(-length // CHUNK)
    pad = n_chunks * CHUNK - length
    if pad:  # identity steps at the end leave every real output unchanged
        a = torch.cat([a, a.new_ones(batch, pad, dim)], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, dim)], dim=1)
    a = a.view(batch, n_chunks, CHUNK, dim)
    b = b.view(batch, n_chunks, CHUNK, dim)
    a_cum, h_local = _doubling_scan(a, b)  # [B, N, C, D]
    # State entering each chunk: the scan over chunk totals, shifted by one chunk.
    h_end = _chunked_scan(a_cum[:, :, -1], h_local[:, :, -1])  # [B, N, D]
    h_in = torch.cat([h_end.new_zeros(batch, 1, dim), h_end[:, :-1]], dim=1)
    h = torch.addcmul(h_local, a_cum, h_in.unsqueeze(2))
    return h.reshape(batch, n_chunks * CHUNK, dim)[:, :length]


def _output_dtypes(a_dtype: torch.dtype, b_dtype: torch.dtype, accumulate_fp64: bool, out_dtype: torch.dtype | None):
    """dtypes of ``(h, h_last)`` and of the accumulation: the inputs' by default; with
    ``out_dtype``, ``h`` in it and ``h_last`` in the accumulation dtype."""
    in_dtype = torch.promote_types(a_dtype, b_dtype)
    acc = accumulation_dtype(in_dtype, accumulate_fp64)
    return (in_dtype, in_dtype, acc) if out_dtype is None else (out_dtype, acc, acc)


def linear_scan_composite(
    a_in: Tensor,
    b_in: Tensor,
    h0: Tensor | None = None,
    reverse: bool = False,
    log_space: bool = False,
    accumulate_fp64: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``mmrec::linear_scan`` in PyTorch ops (the op's CPU implementation), on any device."""
    out_dtype, last_dtype, acc = _output_dtypes(a_in.dtype, b_in.dtype, accumulate_fp64, out_dtype)
    a, b = a_in.to(acc), b_in.to(acc)
    if log_space:
        a = a.exp()
    if reverse:
        a, b = a.flip(1), b.flip(1)
    if h0 is not None:  # fold the initial state into the first input
        b = torch.cat([torch.addcmul(b[:, :1], a[:, :1], h0.to(acc).unsqueeze(1)), b[:, 1:]], dim=1)
    h = _chunked_scan(a, b)
    h_last = h[:, -1].clone()
    if reverse:
        h = h.flip(1)
    h = h.to(out_dtype).contiguous()
    if h.data_ptr() == b_in.data_ptr():  # T == 1 without h0: the scan had nothing to do
        h = h.clone()
    return h, h_last.to(last_dtype)


@functools.cache
def _triton_kernels():
    """The Triton launchers, imported on first use on a GPU; None where Triton is missing."""
    try:
        from mmrec.ops import linear_scan_triton
    except ImportError:
        return None
    return linear_scan_triton


def _forward_cuda(a, b, h0=None, reverse=False, log_space=False, accumulate_fp64=False, out_dtype=None):
    kernels = _triton_kernels()
    if kernels is None:
        return NotImplemented
    return kernels.scan_forward(a, b, h0, reverse, log_space=log_space, accumulate_fp64=accumulate_fp64, out_dtype=out_dtype)


def _forward_fake(a, b, h0=None, reverse=False, log_space=False, accumulate_fp64=False, out_dtype=None):
    h_dtype, last_dtype, _ = _output_dtypes(a.dtype, b.dtype, accumulate_fp64, out_dtype)
    shape = torch.broadcast_shapes(a.shape, b.shape)
    return a.new_empty(shape, dtype=h_dtype), a.new_empty((shape[0], shape[2]), dtype=last_dtype)


_forward_op = Op("linear_scan(Tensor a, Tensor b, Tensor? h0=None, bool reverse=False, bool log_space=False, "
                 "bool accumulate_fp64=False, ScalarType? out_dtype=None) -> (Tensor, Tensor)",
                 composite=linear_scan_composite, cuda=_forward_cuda, fake=_forward_fake)


def _initial(h0: Tensor | None, h: Tensor) -> Tensor:
    return (torch.zeros_like(h[:, :1]) if h0 is None else h0.to(h.dtype).unsqueeze(1))


def _shifted(a: Tensor, h: Tensor, h0: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
    """``a`` one step ahead (1 past the end) and ``h`` one step behind (h0 before the start)."""
    ones = a.new_ones(a.shape[0], 1, a.shape[2])
    if reverse:
        return torch.cat([ones, a[:, :-1]], dim=1), torch.cat([h[:, 1:], _initial(h0, h)], dim=1)
    return torch.cat([a[:, 1:], ones], dim=1), torch.cat([_initial(h0, h), h[:, :-1]], dim=1)


def _adjoint(scan, a, h, grad_h, grad_h_last, h0, reverse, log_space):
    """``(grad_a, g, grad_h0)`` of the scan, with ``scan(a, b, h0, reverse) -> h`` solving
    the adjoint recurrence. The adjoint g_t = dL/dh_t obeys g_t = a_{t+1} g_{t+1} +
    grad_h_t: the same recurrence run the other way, with a shifted by one step and
    grad_h_last entering where the forward scan ended. ``grad_b`` is ``g``; ``grad_h0`` is
    None without ``h0``."""
    gate = a.exp() if log_space else a
    grad_h = torch.zeros_like(h) if grad_h is None else grad_h
    a_next, h_prev = _shifted(gate, h, h0, reverse)
    g = scan(a_next, grad_h, grad_h_last, not reverse)
    grad_a = g * h_prev * gate if log_space else g * h_prev  # d/d(log a) = a d/da
    first = -1 if reverse else 0
    grad_h0 = None if h0 is None else gate[:, first] * g[:, first]
    return grad_a, g, grad_h0


def linear_scan_backward_composite(a, h, grad_h, grad_h_last, h0, reverse, b_dtype, log_space=False, accumulate_fp64=False):
    """``mmrec::linear_scan_backward`` in PyTorch ops (its CPU implementation), on any device:
    the gradients ``(a, b, h0)`` of ``mmrec::linear_scan`` (of ``log a`` with ``log_space``);
    the third is empty without ``h0``."""
    # Everything runs in the accumulation dtype of the inputs (h may be stored narrower,
    # with out_dtype).
    acc = accumulation_dtype(torch.promote_types(a.dtype, b_dtype), accumulate_fp64)
    grad_h = None if grad_h is None else grad_h.to(acc)
    scan = lambda *args: linear_scan_composite(*args)[0]
    grad_a, g, grad_h0 = _adjoint(scan, a.to(acc), h.to(acc), grad_h, grad_h_last, h0, reverse, log_space)
    return grad_a.to(a.dtype), g.to(b_dtype), h.new_empty(0) if h0 is None else grad_h0.to(h0.dtype)


def _backward_cuda(a, h, grad_h, grad_h_last, h0, reverse, b_dtype, log_space=False, accumulate_fp64=False):
    kernels = _triton_kernels()
    if kernels is None:
        return NotImplemented
    return kernels.scan_backward(a, h, grad_h, grad_h_last, h0, reverse, b_dtype, log_space=log_space, accumulate_fp64=accumulate_fp64)


def _backward_fake(a, h, grad_h, grad_h_last, h0, reverse, b_dtype, log_space=False, accumulate_fp64=False):
    grad_h0 = h.new_empty(0) if h0 is None else h0.new_empty(h0.shape)
    return h.new_empty(h.shape, dtype=a.dtype), h.new_empty(h.shape, dtype=b_dtype), grad_h0


_backward_op = Op("linear_scan_backward(Tensor a, Tensor h, Tensor? grad_h, Tensor? grad_h_last, Tensor? h0, "
                  "bool reverse, ScalarType b_dtype, bool log_space=False, bool accumulate_fp64=False) "
                  "-> (Tensor, Tensor, Tensor)",
                  composite=linear_scan_backward_composite, cuda=_backward_cuda, fake=_backward_fake)


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse, log_space, accumulate_fp64, out_dtype):
        h, h_last = _forward_op.below_autograd(a, b, h0, reverse, log_space, accumulate_fp64, out_dtype)
        ctx.save_for_backward(a, h, h0)
        ctx.reverse, ctx.log_space, ctx.accumulate_fp64, ctx.b_dtype = reverse, log_space, accumulate_fp64, b.dtype
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h: Tensor | None, grad_h_last: Tensor | None):
        a, h, h0 = ctx.saved_tensors
        reverse, log_space, fp64 = ctx.reverse, ctx.log_space, ctx.accumulate_fp64
        if not torch.is_grad_enabled():
            # One fused pass (a Triton kernel on CUDA).
            grad_a, grad_b, grad_h0 = _backward_op.below_autograd(
                a, h, grad_h, grad_h_last, h0, reverse, ctx.b_dtype, log_space, fp64)
            return grad_a, grad_b, (grad_h0 if h0 is not None else None), None, None, None, None
        # Double backward: the same formula through differentiable ops.
        scan = lambda *args: linear_scan(*args, accumulate_fp64=fp64)[0]
        grad_a, g, grad_h0 = _adjoint(scan, a, h, grad_h, grad_h_last, h0, reverse, log_space)
        return grad_a.to(a.dtype), g.to(ctx.b_dtype), None if h0 is None else grad_h0.to(h0.dtype), None, None, None, None


def _forward_autograd(a, b, h0=None, reverse=False, log_space=False, accumulate_fp64=False, out_dtype=None):
    args = (a, b, h0, reverse, log_space, accumulate_fp64, out_dtype)
    return _LinearScan.apply(*args) if requires_grad(args) else _forward_op.below_autograd(*args)


_forward_op.differentiate(_forward_autograd)


def linear_scan(
    a: Tensor,
    b: Tensor,
    h0: Tensor | None = None,
    reverse: bool = False,
    *,
    log_space: bool = False,
    accumulate_fp64: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Solve ``h_t = a_t * h_{t-1} + b_t`` along dim 1 of ``[B, T, D]`` inputs.

    Returns ``(h, h_last)``: every state ``[B, T, D]`` and the final one ``[B, D]`` (the
    state after the last step, ``h[:, 0]`` when ``reverse``), for carrying over.
    ``h0`` (``[B, D]``) is the state before the first step. With ``log_space`` the first
    argument is ``log a`` (``a = exp(log a)`` is never materialised; its gradient is the
    one of ``log a``). Accumulates in float32 for low-precision inputs (float64 for float64,
    or for any dtype with ``accumulate_fp64``); outputs keep the inputs' dtype, unless
    ``out_dtype`` is given: then ``h`` is stored in ``out_dtype`` and ``h_last`` is returned
    in the accumulation dtype.
    """
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"linear_scan expects a and b of the same [batch, time, dim] shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if h0 is not None and h0.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"linear_scan expects h0 of shape {(a.shape[0], a.shape[2])}, got {tuple(h0.shape)}")
    return _forward_op(a, b, h0, reverse, log_space, accumulate_fp64, out_dtype)

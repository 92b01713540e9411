"""The parallel part of the chunked delta rule: each chunk reduced to what the chunk loop reads.

For the recurrence and the derivation see ``chunk.py``. Per chunk ``n`` of ``C`` tokens
(per batch element and head), with ``Λ_t = Σ_{s≤t} log α_s`` from the chunk start and
``M_ts = e^{Λ_t − Λ_s}`` (``s ≤ t``, 0 above the diagonal)::

    A  = tril(diag(β) M ⊙ K Kᵀ, −1),   X = (I + A)⁻¹
    W1 = X diag(β) V,     W2 = X diag(β e^Λ) K,     P = M ⊙ Q Kᵀ
    Qd = diag(e^Λ) Q,     Kd = diag(e^{Λ_C − Λ}) K,  g = e^{Λ_C}

``delta_chunk_prepare`` is the custom op ``mmrec::delta_chunk_prepare``: on CUDA one
Triton kernel per layer (``chunk_prepare_triton.py``) reads ``q``, ``k``, ``v``, ``β``,
``log α`` once in the layer's ``[B, T, H, D]`` layout and writes ``W1``, ``W2``, ``Qd``,
``Kd``, ``P``, ``g`` and ``X``, with ``(M ⊙ K Kᵀ)ᵀ`` kept in ``X``'s upper triangle (zero
in ``X`` itself); its backward, ``mmrec::delta_chunk_prepare_backward``, two more kernels,
turns the chunk loop's gradients of the six into those of the five inputs, reusing ``X``,
``M ⊙ K Kᵀ`` and ``P`` rather than summing ``K Kᵀ`` and ``Q Kᵀ`` again. Elsewhere (CPU,
float64) the forward runs :func:`chunk_prepare_reference`, the same products in PyTorch,
and the backward the same algebra as the kernels, batched, in the accumulation dtype (the
CUDA kernels take bf16 products for bf16 gradients).

Every exponent is masked to ``−inf`` above the diagonal before ``exp``, so every decay
factor is at most 1 however strong the decay, and nothing overflows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrec.ops.linear_scan import accumulation_dtype
from mmrec.ops.registration import Op, requires_grad

OUTPUTS = ("w1", "w2", "q_decayed", "k_decayed", "attn", "chunk_decay", "inverse")


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


def to_chunks(x: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """``[B, T, H, ...]`` -> ``[B, H, N, C, ...]`` in ``dtype``, zero-padded in time to ``N · C``."""
    batch, length, heads = x.shape[:3]
    chunks = -(-length // size)
    x = x.to(dtype)
    if chunks * size != length:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, chunks * size - length])
    return x.reshape(batch, chunks, size, heads, *x.shape[3:]).movedim(3, 1)


def chunk_prepare_reference(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor,
                            chunk_size: int, intermediates: torch.dtype | None = None) -> tuple[Tensor, ...]:
    """``(W1, W2, Qd, Kd, P, g, X)`` (module docstring) in PyTorch, differentiable by autograd
    but for ``X``, which carries ``(M ⊙ K Kᵀ)ᵀ`` above its diagonal for the backward.

    ``q``, ``k`` ``[B, T, H, K]``; ``v`` ``[B, T, H, V]``; ``beta``, ``log_alpha`` ``[B, T, H]``.
    Outputs ``[B, H, N, C, V | K | C]`` (``g`` ``[B, H, N]``), computed in ``v``'s accumulation
    dtype; ``W1``, ``W2``, ``Qd``, ``Kd``, ``P`` stored in ``intermediates`` (None: that
    dtype; bfloat16 halves what the chunk loop reads), ``g`` and ``X`` in it; the time
    axis is padded to ``N · C`` with tokens that leave the state as it is (``β = 0``,
    ``α = 1``). ``C`` is ``chunk_size``, or the length if shorter."""
    acc = accumulation_dtype(v.dtype)
    size = min(chunk_size, k.shape[1])
    q, k, v = to_chunks(q, size, acc), to_chunks(k, size, acc), to_chunks(v, size, acc)  # [B, H, N, C, K|V]
    beta, log_alpha = to_chunks(beta, size, acc), to_chunks(log_alpha, size, acc)  # [B, H, N, C]
    cum = log_alpha.cumsum(-1)  # Λ
    index = torch.arange(size, device=k.device)
    causal = index[:, None] >= index[None, :]  # s ≤ t
    # a Python -inf, not a tensor made from it: that would be a blocking host-to-device copy
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # M [B, H, N, C, C]
    decayed_kk = decay * (k @ k.transpose(-1, -2))  # M ⊙ K Kᵀ
    inverse = unit_lower_inverse(beta[..., None] * decayed_kk)  # X
    from_start = cum.exp()[..., None]  # e^Λ [B, H, N, C, 1]
    w1 = inverse @ (beta[..., None] * v)  # X diag(β) V
    w2 = inverse @ ((beta[..., None] * from_start) * k)  # X diag(β e^Λ) K
    attn = decay * (q @ k.transpose(-1, -2))  # P
    k_decayed = k * (cum[..., -1:] - cum).exp()[..., None]
    stored = (x.to(intermediates or acc) for x in (w1, w2, q * from_start, k_decayed, attn))
    packed = inverse.detach() + decayed_kk.detach().tril(-1).transpose(-1, -2)
    return *stored, cum[..., -1].exp(), packed


# ---------------------------------------------------------------------------- the ops


@functools.cache
def _triton_kernels():
    """The Triton launchers, imported on first use on a GPU; None where Triton is missing."""
    try:
        from mmrec.ops.delta_rule import chunk_prepare_triton
    except ImportError:
        return None
    return chunk_prepare_triton


# the kernels hold a chunk's [C, C] tiles on chip and invert by C - 1 serial steps: built,
# tested and measured up to 64; longer chunks (narrow heads allow them) run the PyTorch products
MAX_KERNEL_CHUNK = 64


def _use_triton(v: Tensor, chunk_size: int):
    """The launchers for float32 accumulation and chunks of at most ``MAX_KERNEL_CHUNK``;
    otherwise (float64 in tests, long chunks) the PyTorch products."""
    usable = accumulation_dtype(v.dtype) == torch.float32 and min(chunk_size, v.shape[1]) <= MAX_KERNEL_CHUNK
    return _triton_kernels() if usable else None


def _forward_composite(q, k, v, beta, log_alpha, chunk_size, intermediates=None):
    with torch.no_grad():
        return tuple(x.contiguous() for x in chunk_prepare_reference(q, k, v, beta, log_alpha, chunk_size, intermediates))


def _forward_cuda(q, k, v, beta, log_alpha, chunk_size, intermediates=None):
    kernels = _use_triton(v, chunk_size)
    if kernels is None:
        return NotImplemented
    acc = accumulation_dtype(v.dtype)
    return kernels.prepare_forward(q, k, v, beta, log_alpha, chunk_size, acc, intermediates)


def _forward_fake(q, k, v, beta, log_alpha, chunk_size, intermediates=None):
    batch, length, heads, key_dim = k.shape
    size = min(chunk_size, length)
    lead = (batch, heads, -(-length // size), size)
    acc = accumulation_dtype(v.dtype)
    empty = functools.partial(v.new_empty, dtype=acc)
    stored = functools.partial(v.new_empty, dtype=intermediates or acc)
    return (stored(*lead, v.shape[-1]), stored(*lead, key_dim), stored(*lead, key_dim), stored(*lead, key_dim),
            stored(*lead, size), empty(*lead[:3]), empty(*lead, size))


_forward_op = Op("delta_chunk_prepare(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor log_alpha, int chunk_size, "
                 "ScalarType? intermediates=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
                 composite=_forward_composite, cuda=_forward_cuda, fake=_forward_fake)


def _backward_composite(q, k, v, beta, log_alpha, packed, attn, grad_w1, grad_w2, grad_q_decayed, grad_k_decayed,
                        grad_attn, grad_chunk_decay, chunk_size):
    """The backward of :func:`chunk_prepare_reference` written out (the Triton kernel's algebra,
    batched over chunks; no autograd, which is off below the op), reusing the forward's ``X``,
    ``M ⊙ K Kᵀ`` (above ``X``'s diagonal) and ``P``: ``(dq, dk, dv, dβ, d log α)`` in the
    inputs' dtypes and shapes."""
    batch, length, heads, _ = k.shape
    acc, size, chunks = packed.dtype, packed.shape[-1], packed.shape[2]

    def from_chunks(x: Tensor, like: Tensor) -> Tensor:
        x = x.movedim(1, 3).reshape(batch, chunks * size, heads, *x.shape[4:])[:, :length]
        return x.to(like.dtype).contiguous()

    q_c, k_c, v_c, beta_c = (to_chunks(x, size, acc) for x in (q, k, v, beta))  # [B, H, N, C, ...]
    cum = to_chunks(log_alpha, size, acc).cumsum(-1)  # Λ
    index = torch.arange(size, device=k.device)
    causal = index[:, None] >= index[None, :]
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # M
    from_start, to_end, last = cum.exp(), (cum[..., -1:] - cum).exp(), cum[..., -1]
    decayed_kk, inverse = packed.transpose(-1, -2).tril(-1), packed.tril()  # M ⊙ K Kᵀ, X
    grads = [g.to(acc) for g in (grad_w1, grad_w2, grad_q_decayed, grad_k_decayed, grad_attn, grad_chunk_decay)]
    d_w1, d_w2, d_qd, d_kd, d_attn, d_g = grads
    r1, r2 = beta_c[..., None] * v_c, (beta_c * from_start)[..., None] * k_c  # W = X R
    x_t = inverse.transpose(-1, -2)
    d_x = d_w1 @ r1.transpose(-1, -2) + d_w2 @ r2.transpose(-1, -2)
    d_r1, d_r2 = x_t @ d_w1, x_t @ d_w2
    d_a = -(x_t @ d_x @ x_t).tril(-1)  # through X = (I + A)⁻¹
    through_r2 = (d_r2 * k_c).sum(-1)  # d(β e^Λ)
    d_kk = d_a * beta_c[..., None] * decay  # A = diag(β) M ⊙ K Kᵀ
    d_qk = d_attn * decay  # P = M ⊙ Q Kᵀ
    d_q = d_qk @ k_c + d_qd * from_start[..., None]
    d_k = ((beta_c * from_start)[..., None] * d_r2 + (d_kk + d_kk.transpose(-1, -2)) @ k_c
           + d_qk.transpose(-1, -2) @ q_c + d_kd * to_end[..., None])
    d_beta = (d_r1 * v_c).sum(-1) + through_r2 * from_start + (d_a * decayed_kk).sum(-1)
    through_kd = (d_kd * k_c).sum(-1) * to_end
    d_exponent = d_a * beta_c[..., None] * decayed_kk + d_attn * attn.to(acc)  # through M_ts = e^{Λ_t − Λ_s}
    d_cum = (through_r2 * beta_c * from_start + (d_qd * q_c).sum(-1) * from_start - through_kd
             + d_exponent.sum(-1) - d_exponent.sum(-2))
    d_last = through_kd.sum(-1, keepdim=True) + (d_g * last.exp())[..., None]  # Λ_C, read by every log α
    d_log_alpha = d_cum.flip(-1).cumsum(-1).flip(-1) + d_last
    return (from_chunks(d_q, q), from_chunks(d_k, k), from_chunks(beta_c[..., None] * d_r1, v),
            from_chunks(d_beta, beta), from_chunks(d_log_alpha, log_alpha))


def _backward_cuda(q, k, v, beta, log_alpha, packed, attn, grad_w1, grad_w2, grad_q_decayed, grad_k_decayed,
                   grad_attn, grad_chunk_decay, chunk_size):
    kernels = _use_triton(v, chunk_size)
    if kernels is None:
        return NotImplemented
    grads = (grad_w1, grad_w2, grad_q_decayed, grad_k_decayed, grad_attn, grad_chunk_decay)
    return kernels.prepare_backward(q, k, v, beta, log_alpha, packed, attn, grads)


def _backward_fake(q, k, v, beta, log_alpha, packed, attn, grad_w1, grad_w2, grad_q_decayed, grad_k_decayed,
                   grad_attn, grad_chunk_decay, chunk_size):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, beta, log_alpha))


_backward_op = Op("delta_chunk_prepare_backward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor log_alpha, "
                  "Tensor packed, Tensor attn, Tensor grad_w1, Tensor grad_w2, Tensor grad_q_decayed, Tensor grad_k_decayed, "
                  "Tensor grad_attn, Tensor grad_chunk_decay, int chunk_size) "
                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                  composite=_backward_composite, cuda=_backward_cuda, fake=_backward_fake)


class _DeltaChunkPrepare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, chunk_size, intermediates):
        outputs = _forward_op.below_autograd(q, k, v, beta, log_alpha, chunk_size, intermediates)
        ctx.mark_non_differentiable(outputs[-1])
        ctx.save_for_backward(q, k, v, beta, log_alpha, outputs[-1], outputs[4])
        ctx.chunk_size, ctx.intermediates = chunk_size, intermediates
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        q, k, v, beta, log_alpha, packed, attn = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: autograd through the PyTorch products
            inputs = (q, k, v, beta, log_alpha)
            wanted = [x for x, needed in zip(inputs, ctx.needs_input_grad) if needed]
            pairs = [(out, g) for out, g in zip(chunk_prepare_reference(*inputs, ctx.chunk_size, ctx.intermediates)[:6],
                                                grads) if out.requires_grad]
            found = iter(torch.autograd.grad([out for out, _ in pairs], wanted, [g for _, g in pairs],
                                             create_graph=True, allow_unused=True, materialize_grads=True))
            return (*(next(found) if needed else None for needed in ctx.needs_input_grad[:5]), None, None)
        return (*_backward_op.below_autograd(q, k, v, beta, log_alpha, packed, attn, *grads[:6], ctx.chunk_size),
                None, None)


def _forward_autograd(q, k, v, beta, log_alpha, chunk_size, intermediates=None):
    args = (q, k, v, beta, log_alpha, chunk_size, intermediates)
    return _DeltaChunkPrepare.apply(*args) if requires_grad(args) else _forward_op.below_autograd(*args)


_forward_op.differentiate(_forward_autograd)


def delta_chunk_prepare(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor,
                        chunk_size: int, intermediates: torch.dtype | None = None) -> tuple[Tensor, ...]:
    """``(W1, W2, Qd, Kd, P, g, X)`` for every chunk (module docstring); arguments, shapes and
    dtypes as :func:`chunk_prepare_reference`. ``X`` is not differentiable (the backward reads it,
    and ``M ⊙ K Kᵀ`` above its diagonal)."""
    if k.dim() != 4:
        raise ValueError(f"delta_chunk_prepare expects k of shape [batch, length, heads, key_dim], "
                         f"got {tuple(k.shape)}")
    batch, length, heads, key_dim = k.shape
    expected = {"q": (batch, length, heads, key_dim), "v": (batch, length, heads, v.shape[-1]),
                "beta": (batch, length, heads), "log_alpha": (batch, length, heads)}
    for name, x in {"q": q, "v": v, "beta": beta, "log_alpha": log_alpha}.items():
        if tuple(x.shape) != expected[name]:
            raise ValueError(f"delta_chunk_prepare expects {name} of shape {expected[name]} (from k "
                             f"{tuple(k.shape)}), got {tuple(x.shape)}")
    if chunk_size < 1 or length < 1:
        raise ValueError(f"delta_chunk_prepare needs a chunk size and a length of at least 1, "
                         f"got {chunk_size} and {length}")
    acc = accumulation_dtype(v.dtype)
    if intermediates not in (None, acc) and not (intermediates == torch.bfloat16 and acc == torch.float32):
        raise ValueError(f"delta_chunk_prepare stores its intermediates in the accumulation dtype ({acc}) or, with "
                         f"float32 accumulation, in bfloat16; got {intermediates}")
    return _forward_op(q, k, v, beta, log_alpha, chunk_size, intermediates)

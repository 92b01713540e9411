"""Triton kernels for ``mmrec::gated_rnn`` and ``mmrec::gated_rnn_backward``.

The recurrence ``h_t = z_t ⊙ σ(h_{t-1} W) + γ_t ⊙ h_{t-1}`` is sequential in time but
independent across (batch, head) pairs, so each kernel gives one program to a pair and
loops over the whole sequence inside it, with that head's ``W`` block (``[E, E]``, up to
128 x 128) and the state held in registers in float32 (float64 for float64 inputs). One
launch covers a layer. Per step the forward reads ``z_t`` and ``log γ_t`` (issued one
step ahead, so the loads overlap the arithmetic), forms ``h_{t-1} W`` as a broadcast
product reduced over rows, and writes ``h_t``.

The backward runs the adjoint recurrence the other way: with ``a_t = h_{t-1} W`` and
``s_t = σ(a_t)``, ``dz_t = g_t s_t``, ``dlogγ_t = g_t γ_t h_{t-1}``,
``da_t = g_t z_t s_t (1 - s_t)``, ``g_{t-1} = grad_h_{t-1} + g_t γ_t + da_t W^T``, and
``dW = Σ_t h_{t-1}^T da_t``. The gate is recomputed from the stored ``h_{t-1}`` (one more
matvec per step) rather than stored by the forward. ``dW`` is accumulated in registers
per (batch, head), written to a ``[B, H, E, E]`` float32 buffer and summed over the batch
afterwards (deterministic, no atomics).

Head sizes that are not powers of two are padded to one in registers, with masked loads
and stores. The launchers take any tensors Triton can address, so with
``TRITON_INTERPRET=1`` they run on CPU tensors too, which is how the CPU tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmrec.ops.linear_scan import accumulation_dtype


@triton.jit
def _gated_rnn_fwd_kernel(
    z_ptr, ld_ptr, w_ptr, h0_ptr, h_ptr, hl_ptr,
    T, E,
    s_zb, s_zt, s_zd,
    s_lb, s_lt, s_ld,
    s_wh, s_wi, s_wj,
    s_h0b, s_h0d,
    s_hb, s_ht, s_hd,
    s_hlb, s_hld,
    HAS_H0: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK_E)
    mask = rows < E
    chan = pid_h.to(tl.int64) * E + rows  # this head's channels in the H*E axis

    w = tl.load(w_ptr + pid_h.to(tl.int64) * s_wh + rows[:, None] * s_wi + rows[None, :] * s_wj,
                mask=mask[:, None] & mask[None, :], other=0.0)
    if ACC_FP64:
        w = w.to(tl.float64)
        h = tl.zeros((BLOCK_E,), dtype=tl.float64)
    else:
        w = w.to(tl.float32)
        h = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_H0:
        h += tl.load(h0_ptr + pid_b * s_h0b + chan * s_h0d, mask=mask, other=0.0).to(h.dtype)

    z_ptrs = z_ptr + pid_b * s_zb + chan * s_zd
    ld_ptrs = ld_ptr + pid_b * s_lb + chan * s_ld
    h_ptrs = h_ptr + pid_b * s_hb + chan * s_hd
    z_next = tl.load(z_ptrs, mask=mask & (T > 0), other=0.0)
    ld_next = tl.load(ld_ptrs, mask=mask & (T > 0), other=0.0)
    t = 0
    while t < T:  # not range(): Triton's interpreter can't take it a scalar under NumPy >= 2.4
        z_t = z_next.to(h.dtype)
        ld_t = ld_next.to(h.dtype)
        # the next step's inputs, in flight while this step computes
        z_ptrs += s_zt
        ld_ptrs += s_lt
        z_next = tl.load(z_ptrs, mask=mask & (t + 1 < T), other=0.0)
        ld_next = tl.load(ld_ptrs, mask=mask & (t + 1 < T), other=0.0)

        pre = tl.sum(h[:, None] * w, axis=0)  # h_{t-1} W
        gate = 1.0 / (1.0 + tl.exp(-pre))
        h = z_t * gate + tl.exp(ld_t) * h
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)
        h_ptrs += s_ht
        t += 1

    tl.store(hl_ptr + pid_b * s_hlb + chan * s_hld, h.to(hl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rnn_bwd_kernel(
    z_ptr, ld_ptr, w_ptr, h0_ptr, h_ptr, gh_ptr, ghl_ptr,
    dz_ptr, dld_ptr, dw_ptr, dh0_ptr,
    T, E,
    s_zb, s_zt, s_zd,
    s_lb, s_lt, s_ld,
    s_wh, s_wi, s_wj,
    s_h0b, s_h0d,
    s_hb, s_ht, s_hd,
    s_gb, s_gt, s_gd,
    s_glb, s_gld,
    s_dzb, s_dzt, s_dzd,
    s_dlb, s_dlt, s_dld,
    s_dwb, s_dwh, s_dwi, s_dwj,
    s_dh0b, s_dh0d,
    HAS_H0: tl.constexpr, HAS_DH: tl.constexpr, HAS_DHL: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK_E)
    mask = rows < E
    chan = pid_h.to(tl.int64) * E + rows

    w = tl.load(w_ptr + pid_h.to(tl.int64) * s_wh + rows[:, None] * s_wi + rows[None, :] * s_wj,
                mask=mask[:, None] & mask[None, :], other=0.0)
    if ACC_FP64:
        w = w.to(tl.float64)
        g = tl.zeros((BLOCK_E,), dtype=tl.float64)
        dw = tl.zeros((BLOCK_E, BLOCK_E), dtype=tl.float64)
    else:
        w = w.to(tl.float32)
        g = tl.zeros((BLOCK_E,), dtype=tl.float32)
        dw = tl.zeros((BLOCK_E, BLOCK_E), dtype=tl.float32)
    if HAS_DHL:
        g += tl.load(ghl_ptr + pid_b * s_glb + chan * s_gld, mask=mask, other=0.0).to(g.dtype)
    if HAS_H0:
        h_init = tl.load(h0_ptr + pid_b * s_h0b + chan * s_h0d, mask=mask, other=0.0).to(g.dtype)

    # Walk t = T-1 .. 0; pointers start at the last step (h one step behind).
    last = tl.full((), 0, tl.int64) + (T - 1)
    z_ptrs = z_ptr + pid_b * s_zb + last * s_zt + chan * s_zd
    ld_ptrs = ld_ptr + pid_b * s_lb + last * s_lt + chan * s_ld
    hp_ptrs = h_ptr + pid_b * s_hb + (last - 1) * s_ht + chan * s_hd
    gh_ptrs = gh_ptr + pid_b * s_gb + last * s_gt + chan * s_gd
    dz_ptrs = dz_ptr + pid_b * s_dzb + last * s_dzt + chan * s_dzd
    dld_ptrs = dld_ptr + pid_b * s_dlb + last * s_dlt + chan * s_dld

    z_next = tl.load(z_ptrs, mask=mask & (T > 0), other=0.0)
    ld_next = tl.load(ld_ptrs, mask=mask & (T > 0), other=0.0)
    hp_next = tl.load(hp_ptrs, mask=mask & (T > 1), other=0.0)
    if HAS_DH:
        gh_next = tl.load(gh_ptrs, mask=mask & (T > 0), other=0.0)
    t = T - 1
    while t >= 0:  # not range(), as in the forward kernel
        z_t = z_next.to(g.dtype)
        ld_t = ld_next.to(g.dtype)
        h_prev = hp_next.to(g.dtype)
        if HAS_DH:
            g += gh_next.to(g.dtype)
        # step t-1's inputs, in flight while this step computes
        z_ptrs -= s_zt
        ld_ptrs -= s_lt
        hp_ptrs -= s_ht
        z_next = tl.load(z_ptrs, mask=mask & (t >= 1), other=0.0)
        ld_next = tl.load(ld_ptrs, mask=mask & (t >= 1), other=0.0)
        hp_next = tl.load(hp_ptrs, mask=mask & (t >= 2), other=0.0)
        if HAS_DH:
            gh_ptrs -= s_gt
            gh_next = tl.load(gh_ptrs, mask=mask & (t >= 1), other=0.0)
        if HAS_H0:
            h_prev = tl.where(t == 0, h_init, h_prev)

        pre = tl.sum(h_prev[:, None] * w, axis=0)  # recomputed h_{t-1} W
        gate = 1.0 / (1.0 + tl.exp(-pre))
        decay = tl.exp(ld_t)
        dz = g * gate
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dld_ptrs, (g * decay * h_prev).to(dld_ptr.dtype.element_ty), mask=mask)
        dz_ptrs -= s_dzt
        dld_ptrs -= s_dlt
        da = dz * z_t * (1.0 - gate)
        dw += h_prev[:, None] * da[None, :]
        g = g * decay + tl.sum(w * da[None, :], axis=1)  # + da W^T
        t -= 1

    tl.store(dw_ptr + pid_b * s_dwb + pid_h.to(tl.int64) * s_dwh + rows[:, None] * s_dwi + rows[None, :] * s_dwj,
             dw.to(dw_ptr.dtype.element_ty), mask=mask[:, None] & mask[None, :])
    if HAS_H0:
        tl.store(dh0_ptr + pid_b * s_dh0b + chan * s_dh0d, g.to(dh0_ptr.dtype.element_ty), mask=mask)


def _pick_config(head_dim: int, config: dict | None, backward: bool = False) -> dict:
    block_e = max(16, triton.next_power_of_2(head_dim))
    # W in registers at about 64 fp32 values a thread (128 x 128: 8 warps, 128 registers
    # for sm_90 with contiguous bf16 inputs); the backward also holds dW, which at
    # 128 x 128 and 8 warps still fits in 255 registers without spilling (16 warps
    # would cap them at 128 and spill).
    num_warps = max(1, min(8, block_e * block_e // (1024 if backward else 2048)))
    cfg = {"BLOCK_E": block_e, "num_warps": num_warps}
    cfg.update(config or {})
    return cfg


def _strides(x: Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if x is None else tuple(x.stride())


def gated_rnn_forward(
    z: Tensor,
    log_decay: Tensor,
    weight: Tensor,
    h0: Tensor | None = None,
    *,
    out: tuple[Tensor, Tensor] | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """``(h, h_last)`` as ``mmrec::gated_rnn``: one program per (batch, head), one launch.

    ``out`` takes preallocated ``(h, h_last)``; ``config`` overrides ``BLOCK_E`` (a power
    of two at least the head size) and ``num_warps``.
    """
    batch, length, dim = log_decay.shape
    n_heads, head_dim, _ = weight.shape
    if out is None:
        h = torch.empty((batch, length, dim), dtype=log_decay.dtype, device=log_decay.device)
        h_last = torch.empty((batch, dim), dtype=log_decay.dtype, device=log_decay.device)
    else:
        h, h_last = out
    if batch * dim == 0:
        return h, h_last
    cfg = _pick_config(head_dim, config)
    _gated_rnn_fwd_kernel[(n_heads, batch)](
        z, log_decay, weight, h0, h, h_last,
        length, head_dim,
        *z.stride(), *log_decay.stride(), *weight.stride(), *_strides(h0, 2), *h.stride(), *h_last.stride(),
        HAS_H0=h0 is not None, ACC_FP64=accumulation_dtype(log_decay.dtype) == torch.float64,
        **cfg,
    )
    return h, h_last


def gated_rnn_backward(
    z: Tensor,
    log_decay: Tensor,
    weight: Tensor,
    h0: Tensor | None,
    h: Tensor,
    grad_h: Tensor | None,
    grad_h_last: Tensor | None = None,
    *,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_z, grad_log_decay, grad_weight, grad_h0)`` as ``mmrec::gated_rnn_backward``.

    ``h`` holds the forward states; ``grad_h`` / ``grad_h_last`` the incoming gradients
    (either may be None). ``grad_h0`` is an empty tensor when ``h0`` is None. ``out`` takes
    preallocated ``(grad_z, grad_log_decay, grad_h0)``.
    """
    batch, length, dim = h.shape
    n_heads, head_dim, _ = weight.shape
    acc = accumulation_dtype(log_decay.dtype)
    if out is None:
        grad_z = torch.empty((batch, length, dim), dtype=z.dtype, device=h.device)
        grad_ld = torch.empty((batch, length, dim), dtype=log_decay.dtype, device=h.device)
        grad_h0 = h.new_empty(0) if h0 is None else torch.empty((batch, dim), dtype=h0.dtype, device=h.device)
    else:
        grad_z, grad_ld, grad_h0 = out
    if batch * dim == 0:
        if h0 is not None:
            grad_h0.zero_()
        return grad_z, grad_ld, torch.zeros_like(weight), grad_h0
    grad_w = torch.empty((batch, n_heads, head_dim, head_dim), dtype=acc, device=h.device)  # per (batch, head)
    cfg = _pick_config(head_dim, config, backward=True)
    _gated_rnn_bwd_kernel[(n_heads, batch)](
        z, log_decay, weight, h0, h, h if grad_h is None else grad_h, grad_h_last,  # h: never read
        grad_z, grad_ld, grad_w, grad_h0 if h0 is not None else None,
        length, head_dim,
        *z.stride(), *log_decay.stride(), *weight.stride(), *_strides(h0, 2), *h.stride(),
        *_strides(grad_h, 3), *_strides(grad_h_last, 2),
        *grad_z.stride(), *grad_ld.stride(), *grad_w.stride(),
        *(_strides(grad_h0, 2) if h0 is not None else (0, 0)),
        HAS_H0=h0 is not None, HAS_DH=grad_h is not None, HAS_DHL=grad_h_last is not None,
        ACC_FP64=acc == torch.float64,
        **cfg,
    )
    return grad_z, grad_ld, grad_w.sum(0).to(weight.dtype), grad_h0

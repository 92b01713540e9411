"""Triton kernels for ``mmrec::gated_rnn`` and ``mmrec::gated_rnn_backward``.

The recurrence ``h_t = z_t ⊙ σ(h_{t-1} W) + γ_t ⊙ h_{t-1}`` is sequential in time but
independent across (batch, head) pairs. Each kernel loops over the whole sequence inside
one program, with that head's ``W`` block (``[E, E]``, up to 128 x 128) on chip and the
state in float32 (float64 for float64 inputs); one launch covers a layer. There are two
ways to split the work, chosen by ``BLOCK_B`` in the launch config:

- ``BLOCK_B = 1``: one program per (sequence, head). Each step forms ``h_{t-1} W`` as a
  broadcast product reduced over rows (a matrix-vector product on the CUDA cores).
  Float64 always runs this way.
- ``BLOCK_B >= 16``: one program per (block of ``BLOCK_B`` sequences, head). Each step is
  a ``[BLOCK_B, E] @ [E, E]`` product with ``tl.dot`` on the tensor cores, so a large
  batch needs fewer, busier programs. The dot's operands are in ``W``'s dtype: for
  bf16 / fp16 weights the fp32 state (and, in the backward, the fp32 adjoint) enters the
  product as two 16-bit parts, ``hi + lo`` (``SPLIT``, the default: two dots, about fp32
  accuracy of the state), or rounded to one (``SPLIT=False``: one dot, about 1e-3);
  the state itself stays fp32 and the products accumulate in fp32. fp32 weights use
  ``PRECISION`` (``"ieee"`` by default, exact fp32; ``"tf32"`` / ``"tf32x3"`` trade
  accuracy for speed). Rows past the batch are masked to zero and stay zero. Under the
  Triton interpreter (``UPCAST``) the 16-bit operands are multiplied as fp32 values,
  which gives the same products (its 16-bit ``tl.dot`` does not).

Per step the forward reads ``z_t`` and ``log γ_t`` (issued one step ahead, so the loads
overlap the arithmetic) and writes ``h_t``. The backward runs the adjoint recurrence the
other way: with ``a_t = h_{t-1} W`` and ``s_t = σ(a_t)``, ``dz_t = g_t s_t``,
``dlogγ_t = g_t γ_t h_{t-1}``, ``da_t = g_t z_t s_t (1 - s_t)``,
``g_{t-1} = grad_h_{t-1} + g_t γ_t + da_t W^T``, and ``dW = Σ_t h_{t-1}^T da_t``. The gate
is recomputed from the stored ``h_{t-1}`` rather than stored by the forward. ``dW`` is
accumulated on chip per program, written to a float32 buffer (one ``[E, E]`` block per
program) and summed afterwards (deterministic, no atomics).

Head sizes that are not powers of two are padded to one on chip, with masked loads and
stores. The inputs ``z``, ``log γ``, ``h0`` and the incoming gradients may have any strides;
``W``, the stored states and every output are laid out contiguously, so the kernels derive
their strides from the shapes and a launch passes fewer arguments (host time). With
``TRITON_INTERPRET=1`` the launchers run on CPU tensors too, which is how the CPU tests
check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmrec.ops.launch import cached_config, device_sm_count
from mmrec.ops.linear_scan import accumulation_dtype


@triton.jit
def _owned_strides(T, E):
    """Strides of the tensors the launchers lay out contiguously, from the shapes: the
    ``[B, T, D]`` states and gradients (``D = H E``, the heads ``H`` counted by the grid's axis 0;
    channels stride 1), ``h_last`` / ``dh0`` ``[B, D]`` (a sequence is one step of ``D``),
    and ``W`` ``[H, E, E]`` per head (rows stride ``E``; ``dW`` adds one such block of heads per
    program)."""
    D = tl.num_programs(0).to(tl.int64) * E
    return T * D, D, E * E


@triton.jit
def _gated_rnn_fwd_kernel(
    z_ptr, ld_ptr, w_ptr, h0_ptr, h_ptr, hl_ptr,
    T, E,
    s_zb, s_zt, s_zd,
    s_lb, s_lt, s_ld,
    s_h0b, s_h0d,
    HAS_H0: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_h = tl.program_id(0)
    s_seq, s_step, s_head = _owned_strides(T, E)  # W, the states and the outputs: contiguous
    pid_b = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK_E)
    mask = rows < E
    chan = pid_h.to(tl.int64) * E + rows  # this head's channels in the H*E axis

    w = tl.load(w_ptr + pid_h.to(tl.int64) * s_head + rows[:, None] * E + rows[None, :],
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
    h_ptrs = h_ptr + pid_b * s_seq + chan
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
        h_ptrs += s_step
        t += 1

    tl.store(hl_ptr + pid_b * s_step + chan, h.to(hl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rnn_bwd_kernel(
    z_ptr, ld_ptr, w_ptr, h0_ptr, h_ptr, gh_ptr, ghl_ptr,
    dz_ptr, dld_ptr, dw_ptr, dh0_ptr,
    T, E,
    s_zb, s_zt, s_zd,
    s_lb, s_lt, s_ld,
    s_h0b, s_h0d,
    s_gb, s_gt, s_gd,
    s_glb, s_gld,
    HAS_H0: tl.constexpr, HAS_DH: tl.constexpr, HAS_DHL: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_h = tl.program_id(0)
    s_seq, s_step, s_head = _owned_strides(T, E)  # W, the states and the outputs: contiguous
    pid_b = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK_E)
    mask = rows < E
    chan = pid_h.to(tl.int64) * E + rows

    w = tl.load(w_ptr + pid_h.to(tl.int64) * s_head + rows[:, None] * E + rows[None, :],
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
    hp_ptrs = h_ptr + pid_b * s_seq + (last - 1) * s_step + chan
    gh_ptrs = gh_ptr + pid_b * s_gb + last * s_gt + chan * s_gd
    dz_ptrs = dz_ptr + pid_b * s_seq + last * s_step + chan
    dld_ptrs = dld_ptr + pid_b * s_seq + last * s_step + chan

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
        hp_ptrs -= s_step
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
        dz_ptrs -= s_step
        dld_ptrs -= s_step
        da = dz * z_t * (1.0 - gate)
        dw += h_prev[:, None] * da[None, :]
        g = g * decay + tl.sum(w * da[None, :], axis=1)  # + da W^T
        t -= 1

    dw_block = pid_b * tl.num_programs(0) + pid_h  # dW [programs, H, E, E]: this program's head
    tl.store(dw_ptr + dw_block * s_head + rows[:, None] * E + rows[None, :],
             dw.to(dw_ptr.dtype.element_ty), mask=mask[:, None] & mask[None, :])
    if HAS_H0:
        tl.store(dh0_ptr + pid_b * s_step + chan, g.to(dh0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``a`` and ``b`` already in the operand dtype."""
    if UPCAST:
        # Triton's interpreter multiplies 16-bit floats as their raw bits; the same
        # (already rounded) values in fp32 give the tensor cores' exact products.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif b.dtype == tl.float32:
        return tl.dot(a, b, input_precision=PRECISION)
    else:
        return tl.dot(a, b)  # 16-bit operands: PRECISION is for fp32 only


@triton.jit
def _split(x, dtype: tl.constexpr):
    """fp32 ``x`` as ``hi + lo`` in ``dtype``: about twice the mantissa of one rounding."""
    hi = x.to(dtype)
    return hi, (x - hi.to(tl.float32)).to(dtype)


@triton.jit
def _dot_left(a, b, SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``a`` @ ``b`` (in its operand dtype); with ``SPLIT``, ``a`` as two parts."""
    if SPLIT:
        hi, lo = _split(a, b.dtype)
        return _dot(hi, b, PRECISION, UPCAST) + _dot(lo, b, PRECISION, UPCAST)
    else:
        return _dot(a.to(b.dtype), b, PRECISION, UPCAST)


@triton.jit
def _gated_rnn_fwd_block_kernel(
    z_ptr, ld_ptr, w_ptr, h0_ptr, h_ptr, hl_ptr,
    B, T, E,
    s_zb, s_zt, s_zd,
    s_lb, s_lt, s_ld,
    s_h0b, s_h0d,
    HAS_H0: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_h = tl.program_id(0)
    s_seq, s_step, s_head = _owned_strides(T, E)  # W, the states and the outputs: contiguous
    seqs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_E)
    mask = (seqs < B)[:, None] & (cols < E)[None, :]  # [BLOCK_B, BLOCK_E]
    seq = seqs.to(tl.int64)[:, None]
    chan = (pid_h.to(tl.int64) * E + cols)[None, :]  # this head's channels in the H*E axis

    # W in its own dtype: the dot's right operand, on chip for the whole sequence
    w = tl.load(w_ptr + pid_h.to(tl.int64) * s_head + cols[:, None] * E + cols[None, :],
                mask=(cols < E)[:, None] & (cols < E)[None, :], other=0.0)
    h = tl.zeros((BLOCK_B, BLOCK_E), dtype=tl.float32)
    if HAS_H0:
        h += tl.load(h0_ptr + seq * s_h0b + chan * s_h0d, mask=mask, other=0.0).to(tl.float32)

    z_ptrs = z_ptr + seq * s_zb + chan * s_zd
    ld_ptrs = ld_ptr + seq * s_lb + chan * s_ld
    h_ptrs = h_ptr + seq * s_seq + chan
    z_next = tl.load(z_ptrs, mask=mask & (T > 0), other=0.0)
    ld_next = tl.load(ld_ptrs, mask=mask & (T > 0), other=0.0)
    t = 0
    while t < T:  # not range(), as in the per-sequence kernels
        z_t = z_next.to(tl.float32)
        ld_t = ld_next.to(tl.float32)
        z_ptrs += s_zt
        ld_ptrs += s_lt
        z_next = tl.load(z_ptrs, mask=mask & (t + 1 < T), other=0.0)
        ld_next = tl.load(ld_ptrs, mask=mask & (t + 1 < T), other=0.0)

        pre = _dot_left(h, w, SPLIT, PRECISION, UPCAST)  # h_{t-1} W: [BLOCK_B, BLOCK_E]
        gate = 1.0 / (1.0 + tl.exp(-pre))
        h = z_t * gate + tl.exp(ld_t) * h
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)
        h_ptrs += s_step
        t += 1

    tl.store(hl_ptr + seq * s_step + chan, h.to(hl_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_rnn_bwd_block_kernel(
    z_ptr, ld_ptr, w_ptr, h0_ptr, h_ptr, gh_ptr, ghl_ptr,
    dz_ptr, dld_ptr, dw_ptr, dh0_ptr,
    B, T, E,
    s_zb, s_zt, s_zd,
    s_lb, s_lt, s_ld,
    s_h0b, s_h0d,
    s_gb, s_gt, s_gd,
    s_glb, s_gld,
    HAS_H0: tl.constexpr, HAS_DH: tl.constexpr, HAS_DHL: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_h = tl.program_id(0)
    s_seq, s_step, s_head = _owned_strides(T, E)  # W, the states and the outputs: contiguous
    pid_b = tl.program_id(1)
    seqs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_E)
    mask = (seqs < B)[:, None] & (cols < E)[None, :]  # [BLOCK_B, BLOCK_E]
    seq = seqs.to(tl.int64)[:, None]
    chan = (pid_h.to(tl.int64) * E + cols)[None, :]

    w_mask = (cols < E)[:, None] & (cols < E)[None, :]
    w = tl.load(w_ptr + pid_h.to(tl.int64) * s_head + cols[:, None] * E + cols[None, :], mask=w_mask, other=0.0)
    w_t = tl.trans(w)  # for da W^T
    g = tl.zeros((BLOCK_B, BLOCK_E), dtype=tl.float32)  # dL/dh_t over all paths
    dw = tl.zeros((BLOCK_E, BLOCK_E), dtype=tl.float32)
    if HAS_DHL:
        g += tl.load(ghl_ptr + seq * s_glb + chan * s_gld, mask=mask, other=0.0).to(tl.float32)
    if HAS_H0:
        h_init = tl.load(h0_ptr + seq * s_h0b + chan * s_h0d, mask=mask, other=0.0).to(tl.float32)

    # Walk t = T-1 .. 0; pointers start at the last step (h one step behind).
    last = tl.full((), 0, tl.int64) + (T - 1)
    z_ptrs = z_ptr + seq * s_zb + last * s_zt + chan * s_zd
    ld_ptrs = ld_ptr + seq * s_lb + last * s_lt + chan * s_ld
    hp_ptrs = h_ptr + seq * s_seq + (last - 1) * s_step + chan
    gh_ptrs = gh_ptr + seq * s_gb + last * s_gt + chan * s_gd
    dz_ptrs = dz_ptr + seq * s_seq + last * s_step + chan
    dld_ptrs = dld_ptr + seq * s_seq + last * s_step + chan

    z_next = tl.load(z_ptrs, mask=mask & (T > 0), other=0.0)
    ld_next = tl.load(ld_ptrs, mask=mask & (T > 0), other=0.0)
    hp_next = tl.load(hp_ptrs, mask=mask & (T > 1), other=0.0)
    if HAS_DH:
        gh_next = tl.load(gh_ptrs, mask=mask & (T > 0), other=0.0)
    t = T - 1
    while t >= 0:
        z_t = z_next.to(tl.float32)
        ld_t = ld_next.to(tl.float32)
        h_prev = hp_next.to(tl.float32)
        if HAS_DH:
            g += gh_next.to(tl.float32)
        z_ptrs -= s_zt
        ld_ptrs -= s_lt
        hp_ptrs -= s_step
        z_next = tl.load(z_ptrs, mask=mask & (t >= 1), other=0.0)
        ld_next = tl.load(ld_ptrs, mask=mask & (t >= 1), other=0.0)
        hp_next = tl.load(hp_ptrs, mask=mask & (t >= 2), other=0.0)
        if HAS_DH:
            gh_ptrs -= s_gt
            gh_next = tl.load(gh_ptrs, mask=mask & (t >= 1), other=0.0)
        if HAS_H0:
            h_prev = tl.where(t == 0, h_init, h_prev)

        pre = _dot_left(h_prev, w, SPLIT, PRECISION, UPCAST)  # recomputed h_{t-1} W
        gate = 1.0 / (1.0 + tl.exp(-pre))
        decay = tl.exp(ld_t)
        dz = g * gate
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dld_ptrs, (g * decay * h_prev).to(dld_ptr.dtype.element_ty), mask=mask)
        dz_ptrs -= s_step
        dld_ptrs -= s_step
        da = dz * z_t * (1.0 - gate)
        # dW += h_{t-1}^T da_t over the block's sequences; with SPLIT, all but lo x lo
        if SPLIT:
            h_hi, h_lo = _split(h_prev, w.dtype)
            da_hi, da_lo = _split(da, w.dtype)
            dw += _dot(tl.trans(h_hi), da_hi, PRECISION, UPCAST)
            dw += _dot(tl.trans(h_lo), da_hi, PRECISION, UPCAST) + _dot(tl.trans(h_hi), da_lo, PRECISION, UPCAST)
        else:
            dw += _dot(tl.trans(h_prev.to(w.dtype)), da.to(w.dtype), PRECISION, UPCAST)
        g = g * decay + _dot_left(da, w_t, SPLIT, PRECISION, UPCAST)  # + da W^T
        t -= 1

    dw_block = pid_b.to(tl.int64) * tl.num_programs(0) + pid_h  # dW [programs, H, E, E]: this program's head
    tl.store(dw_ptr + dw_block * s_head + cols[:, None] * E + cols[None, :],
             dw.to(dw_ptr.dtype.element_ty), mask=w_mask)
    if HAS_H0:
        tl.store(dh0_ptr + seq * s_step + chan, g.to(dh0_ptr.dtype.element_ty), mask=mask)


SMALL_BATCH = 8  # below this many sequences, one program per sequence (more programs to spread)


def _num_sms(device: torch.device) -> int:
    return device_sm_count(device) or 132  # an H200's count for the interpreter's CPU tensors


def pick_config(batch: int, n_heads: int, head_dim: int, *, device: torch.device, weight_dtype: torch.dtype,
                fp64: bool = False, backward: bool = False, config: dict | None = None) -> dict:
    """The launch config; ``config`` overrides any entry. ``BLOCK_B``: 1 (one sequence per
    program) or a power of two >= 16; ``BLOCK_E``; ``num_warps``; blocked only: ``SPLIT``
    (16-bit weights: round the fp32 operands of each product to two 16-bit parts rather
    than one) and ``PRECISION`` (fp32 weights: ``tl.dot``'s ``input_precision``)."""
    config = dict(config or {})
    block_e = max(16, triton.next_power_of_2(head_dim))
    if fp64 or batch < SMALL_BATCH:
        block_b = 1
    else:
        # One program per (head, block of sequences): the smallest block that still fits
        # the grid in one wave of SMs, since each program is bound by its step latency.
        block_b, sms = 16, _num_sms(device)
        while block_b < 64 and n_heads * triton.cdiv(batch, block_b) > sms:
            block_b *= 2
    block_b = config.pop("BLOCK_B", block_b)
    if block_b != 1 and (block_b < 16 or block_b & (block_b - 1)):
        raise ValueError(f"BLOCK_B must be 1 or a power of two >= 16 (tl.dot's smallest tile), got {block_b}")
    if block_b != 1 and fp64:
        raise ValueError("float64 runs one sequence per program (BLOCK_B=1)")
    if block_b == 1:
        # W in registers at about 64 fp32 values a thread (128 x 128: 8 warps, 128
        # registers for sm_90 with contiguous bf16 inputs); the backward also holds dW,
        # which at 128 x 128 and 8 warps still fits in 255 registers without spilling
        # (16 warps would cap them at 128 and spill).
        num_warps = max(1, min(8, block_e * block_e // (1024 if backward else 2048)))
        cfg = {"BLOCK_B": 1, "BLOCK_E": block_e, "num_warps": num_warps}
    else:
        # the forward holds a [BLOCK_B, E] fp32 state; the backward also a [E, E] fp32 dW
        # SPLIT: the fp32 operands as two 16-bit parts, for about fp32 state accuracy
        # (irrelevant, so off, for fp32 weights, which multiply at PRECISION)
        split = weight_dtype in (torch.bfloat16, torch.float16)
        cfg = {"BLOCK_B": block_b, "BLOCK_E": block_e, "num_warps": 8 if backward else 4, "SPLIT": split, "PRECISION": "ieee"}
    cfg.update(config)
    return cfg


launch_config = cached_config(pick_config)


def _launch_args(cfg: dict) -> tuple[int, dict]:
    """``(BLOCK_B, the kernel's keyword arguments)``: the per-sequence kernels take no ``PRECISION``."""
    cfg = dict(cfg)
    block_b = cfg.pop("BLOCK_B")
    if block_b == 1:
        cfg.pop("PRECISION", None)
        cfg.pop("SPLIT", None)
    return block_b, cfg


def _strides(x: Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if x is None else tuple(x.stride())


def _contiguous_out(out: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``out`` as given: the kernels write contiguous layouts (their strides follow from the shapes)."""
    if not all(x.is_contiguous() for x in out):
        raise ValueError("the gated_rnn kernels write contiguous outputs: pass contiguous out tensors")
    return out


def gated_rnn_forward(
    z: Tensor,
    log_decay: Tensor,
    weight: Tensor,
    h0: Tensor | None = None,
    *,
    out: tuple[Tensor, Tensor] | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """``(h, h_last)`` as ``mmrec::gated_rnn``, one launch.

    ``out`` takes preallocated ``(h, h_last)``; ``config`` overrides the launch config
    (``BLOCK_B``, ``BLOCK_E``, ``num_warps``, ``PRECISION``; see ``pick_config``).
    """
    batch, length, dim = log_decay.shape
    n_heads, head_dim, _ = weight.shape
    if out is None:
        h = torch.empty((batch, length, dim), dtype=log_decay.dtype, device=log_decay.device)
        h_last = torch.empty((batch, dim), dtype=log_decay.dtype, device=log_decay.device)
    else:
        h, h_last = _contiguous_out(out)
    if batch * dim == 0:
        return h, h_last
    fp64 = accumulation_dtype(log_decay.dtype) == torch.float64
    block_b, cfg = _launch_args(launch_config(batch, n_heads, head_dim, device=z.device, weight_dtype=weight.dtype, fp64=fp64, config=config))
    weight = weight.contiguous()
    strides = (*z.stride(), *log_decay.stride(), *_strides(h0, 2))
    # grid axis 0 is the heads: the kernels read their count from it for the derived strides
    if block_b == 1:
        _gated_rnn_fwd_kernel[(n_heads, batch)](
            z, log_decay, weight, h0, h, h_last, length, head_dim, *strides,
            HAS_H0=h0 is not None, ACC_FP64=fp64, **cfg,
        )
    else:
        _gated_rnn_fwd_block_kernel[(n_heads, triton.cdiv(batch, block_b))](
            z, log_decay, weight, h0, h, h_last, batch, length, head_dim, *strides,
            HAS_H0=h0 is not None, UPCAST=not z.is_cuda, BLOCK_B=block_b, **cfg,
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
    preallocated ``(grad_z, grad_log_decay, grad_h0)``; ``config`` as in the forward.
    """
    batch, length, dim = h.shape
    n_heads, head_dim, _ = weight.shape
    acc = accumulation_dtype(log_decay.dtype)
    if out is None:
        grad_z = torch.empty((batch, length, dim), dtype=z.dtype, device=h.device)
        grad_ld = torch.empty((batch, length, dim), dtype=log_decay.dtype, device=h.device)
        grad_h0 = h.new_empty(0) if h0 is None else torch.empty((batch, dim), dtype=h0.dtype, device=h.device)
    else:
        grad_z, grad_ld, grad_h0 = _contiguous_out(out)
    if batch * dim == 0:
        if h0 is not None:
            grad_h0.zero_()
        return grad_z, grad_ld, torch.zeros_like(weight), grad_h0
    fp64 = acc == torch.float64
    cfg = launch_config(batch, n_heads, head_dim, device=h.device, weight_dtype=weight.dtype, fp64=fp64, backward=True,
                      config=config)
    block_b, cfg = _launch_args(cfg)
    programs = triton.cdiv(batch, block_b)
    grad_w = torch.empty((programs, n_heads, head_dim, head_dim), dtype=acc, device=h.device)  # per program
    h = h.contiguous()
    args = (
        z, log_decay, weight.contiguous(), h0, h, h if grad_h is None else grad_h, grad_h_last,  # h: never read
        grad_z, grad_ld, grad_w, grad_h0 if h0 is not None else None,
    )
    strides = (*z.stride(), *log_decay.stride(), *_strides(h0, 2), *_strides(grad_h, 3), *_strides(grad_h_last, 2))
    # grid axis 0 is the heads, as in the forward
    flags = {"HAS_H0": h0 is not None, "HAS_DH": grad_h is not None, "HAS_DHL": grad_h_last is not None}
    if block_b == 1:
        _gated_rnn_bwd_kernel[(n_heads, batch)](*args, length, head_dim, *strides, ACC_FP64=fp64, **flags, **cfg)
    else:
        _gated_rnn_bwd_block_kernel[(n_heads, programs)](
            *args, batch, length, head_dim, *strides, UPCAST=not z.is_cuda, BLOCK_B=block_b, **flags, **cfg,
        )
    grad_w = grad_w[0] if programs == 1 else grad_w.sum(0)  # one program: no reduction to launch
    return grad_z, grad_ld, grad_w.to(weight.dtype), grad_h0

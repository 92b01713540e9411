"""Triton kernels for ``mmrec::delta_chunk_prepare`` and its backward: one program per
(batch, head, chunk) on a one-dimensional grid (the backward's ``dq``, ``dk`` kernel one per
chunk and block of key columns), everything of the chunk on chip.

The forward reads the chunk's ``q``, ``k`` ``[C, K]``, ``v`` ``[C, V]``, ``β`` and ``log α``
straight from the layer's ``[B, T, H, D]`` layout (any strides, the time axis padded on
chip), ``BLOCK_D`` feature columns at a time, and writes what the chunk loop reads
(``W1``, ``W2``, ``Qd``, ``Kd``, ``P``, ``g``; ``chunk_prepare.py`` defines them) plus
``X = (I + A)⁻¹`` with ``(M ⊙ K Kᵀ)ᵀ`` in its upper triangle, which the backward reuses.
It computes in fp32; the first five may be
stored in bf16 (the output tensors' dtype), and the backward reads their gradients in
whatever dtype they come.

``X`` comes from its diagonal 16-row blocks, inverted on the CUDA cores in a
``[C/16, 16, 16]`` tile, then joined by a short series of products on the tensor cores
(``_unit_lower_inverse_compact``); with ``INVERSE="blocks"``, the same but the diagonal
blocks by forward substitution as products on the tensor cores
(``_unit_lower_inverse_blocks``); or, with ``INVERSE="rows"``, from forward substitution
over the whole chunk, one row of ``X`` per step (the kernel keeps ``Xᵀ``, so each step is
a column update with no layout change)::

    X[t, :] = e_t − Σ_{s<t} A[t, s] X[s, :]

The backward, two kernels, recomputes the chunk's decays from the same inputs, reads the
forward's ``X``, ``M ⊙ K Kᵀ`` and ``P`` (rather than summing ``K Kᵀ`` and ``Q Kᵀ`` again),
takes the chunk loop's gradients of those six outputs, and writes the gradients of ``q``,
``k``, ``v``, ``β`` and ``log α`` in the layer's layout: the first everything but ``dq``,
``dk`` and, for them, the gradients of ``K Kᵀ`` and ``Q Kᵀ``; the second ``dq``, ``dk``, a
program per chunk and block of key columns. ``A``'s gradient is ``−Xᵀ dX Xᵀ`` (strictly
lower), so the backward needs no solve. ``log α`` enters through ``Λ``, the cumulative
sum inside the chunk, so its gradient is the reverse cumulative sum of ``Λ``'s, and no
chunk needs another's.

The forward's pass that sums ``K Kᵀ`` and ``Q Kᵀ`` over feature blocks is unrolled
(``tl.static_range``), not a loop: as a loop, Triton 3.6 on sm_90 miscompiled that pair in some
launch configs (``Q Kᵀ`` wrong, and not the same twice; docs/notes/delta-kernel.md, "A
miscompiled loop"). Keep it unrolled unless the CUDA tests, which try every benchmarked
config twice, pass with a loop.

Products take fp32 operands at ``PRECISION`` (``chunk_scan_triton._dot``; from
``torch.get_float32_matmul_precision()`` by default) and accumulate in fp32. The backward
of bf16 intermediates (its incoming gradients in bf16) rounds every operand to bf16
instead (``X``, ``q``, ``k`` and its own ``[C, C]`` gradients too), whatever the matmul
precision, as the chunk loop does with bf16 intermediates: the caller asked for bf16's
precision there, and one bf16 product has twice tf32's rate. Under
``TRITON_INTERPRET=1`` the launchers run on CPU tensors (float32 or float64), bf16
products rounded as on the GPU and multiplied exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmrec.ops.delta_rule.chunk_scan_triton import _dot, default_precision
from mmrec.ops.launch import cached_config


@triton.jit
def _load_block(ptr, b, h, t, valid, s_b, s_t, s_h, s_d, d0, D, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Columns ``d0 .. d0 + BLOCK_D`` of the chunk's rows ``t`` of a ``[B, T, H, D]`` tensor, in
    ``ACC``, zero past the sequence's end and past ``D``."""
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (cols < D)[None, :]
    return tl.load(ptr + b * s_b + h * s_h + t[:, None] * s_t + cols[None, :] * s_d, mask=mask, other=0.0).to(ACC)


@triton.jit
def _chunk_rows(chunk, T, H, N, C, BLOCK_C: tl.constexpr):
    """Where chunk ``chunk`` (``(b H + h) N + n``) lies: ``b``, ``h``, its rows ``0 .. BLOCK_C``,
    their times ``t``, the rows the chunk has (``in_c``) and those before the sequence's end."""
    n, bh = chunk % N, chunk // N
    rows = tl.arange(0, BLOCK_C)
    t = n * C + rows
    in_c = rows < C
    return bh // H, bh % H, rows, t, in_c, in_c & (t < T)


@triton.jit
def _gates(beta_ptr, la_ptr, b, h, t, valid, s_bb, s_bt, s_bh, s_ab, s_at, s_ah, ACC: tl.constexpr):
    """``β`` (0 past the sequence's end), ``Λ`` (the cumulative ``log α`` from the chunk start;
    ``log α`` = 0 past the end, so padding leaves the state as it is) and ``Λ_C``."""
    beta = tl.load(beta_ptr + b * s_bb + h * s_bh + t * s_bt, mask=valid, other=0.0).to(ACC)
    la = tl.load(la_ptr + b * s_ab + h * s_ah + t * s_at, mask=valid, other=0.0).to(ACC)
    return beta, tl.cumsum(la, 0), tl.sum(la, 0)


@triton.jit
def _decays(beta_ptr, la_ptr, b, h, t, valid, s_bb, s_bt, s_bh, s_ab, s_at, s_ah, BLOCK_C: tl.constexpr,
            ACC: tl.constexpr):
    """``_gates`` and the decays ``M_ts = e^{Λ_t − Λ_s}`` (s ≤ t, 0 above the diagonal)."""
    beta, lam, lam_last = _gates(beta_ptr, la_ptr, b, h, t, valid, s_bb, s_bt, s_bh, s_ab, s_at, s_ah, ACC)
    rows = tl.arange(0, BLOCK_C)
    lower = rows[:, None] >= rows[None, :]
    decay = tl.exp(tl.where(lower, lam[:, None] - lam[None, :], float("-inf")))
    return beta, lam, lam_last, decay


@triton.jit
def _unit_lower_inverse_t(a, BLOCK_C: tl.constexpr):
    """``((I + A)⁻¹)ᵀ`` for ``A`` ``[BLOCK_C, BLOCK_C]`` zero on and above the diagonal, by
    forward substitution: column ``t`` of ``Y = Xᵀ`` is ``e_t − Σ_{s<t} A[t, s] Y[:, s]``."""
    rows = tl.arange(0, BLOCK_C)
    y = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0).to(a.dtype)
    for t in range(1, BLOCK_C):
        a_t = tl.sum(tl.where(rows[:, None] == t, a, 0.0), 0)  # A[t, :]
        y_t = tl.sum(y * a_t[None, :], 1)  # Σ_s Y[:, s] A[t, s]
        y = tl.where(rows[None, :] == t, y - y_t[:, None], y)
    return y


@triton.jit
def _unit_lower_inverse_blocks(a, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """``(I + A)⁻¹`` as above, in blocks of 16 rows and mostly on the tensor cores: forward
    substitution inside every diagonal block at once (15 products, each finishing one row of
    every block), giving the block-diagonal ``X_d = (I + A_d)⁻¹``; then ``_join_blocks``."""
    rows = tl.arange(0, BLOCK_C)
    same_block = (rows[:, None] // 16) == (rows[None, :] // 16)
    a_diag = tl.where(same_block, a, 0.0)
    y = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0).to(a.dtype)  # X_dᵀ, column by column
    for r in range(1, 16):
        a_r = tl.where((rows % 16 == r)[:, None], a_diag, 0.0)  # row r of every block
        y -= _dot(y, tl.trans(a_r), PRECISION)
    return _join_blocks(tl.trans(y), a, BLOCK_C, PRECISION)


@triton.jit
def _join_blocks(x_diag, a, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """``(I + A)⁻¹`` from ``X_d``, the inverse of its 16-row diagonal blocks: with ``A_o`` the part
    below them, ``(I + A)⁻¹ = (I + N)⁻¹ X_d`` for ``N = X_d A_o``, nilpotent (``N^{C/16} = 0``),
    so ``Σ_j (−N)^j X_d``: ``C/16`` products."""
    rows = tl.arange(0, BLOCK_C)
    same_block = (rows[:, None] // 16) == (rows[None, :] // 16)
    n = _dot(x_diag, tl.where(same_block, 0.0, a), PRECISION)  # N = X_d A_o
    term = x_diag
    x = x_diag
    for _ in range(1, BLOCK_C // 16):
        term = -_dot(n, term, PRECISION)  # (−N)^j X_d
        x += term
    return x


@triton.jit
def _unit_lower_inverse_compact(a, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """``(I + A)⁻¹`` as ``_unit_lower_inverse_blocks``, but the diagonal blocks inverted on
    the CUDA cores in a compact ``[C/16, 16, 16]`` layout: 15 substitution steps, each a
    product-and-sum over 16 x 16 values per block instead of a ``[C, C]`` product (and exact
    fp32 rather than ``PRECISION``); then the same ``C/16`` products across blocks."""
    NB: tl.constexpr = BLOCK_C // 16
    rows = tl.arange(0, BLOCK_C)
    blocks = tl.arange(0, NB)
    local = tl.arange(0, 16)
    # A_c[b, r, s] = A[16 b + r, 16 b + s]: each row's own diagonal block
    own = blocks[None, :, None] == (rows // 16)[:, None, None]  # [C, NB, 1]
    a_c = tl.reshape(tl.sum(tl.where(own, tl.reshape(a, (BLOCK_C, NB, 16)), 0.0), 1), (NB, 16, 16))
    x_c = tl.where(local[:, None] == local[None, :], 1.0, 0.0).to(a.dtype)[None, :, :] + tl.zeros((NB, 16, 16), a.dtype)
    for r in range(1, 16):
        a_r = tl.sum(tl.where(local[None, :, None] == r, a_c, 0.0), 1)  # [NB, 16]: row r of every block
        update = tl.sum(a_r[:, :, None] * x_c, 1)  # Σ_{s<r} A[r, s] X[s, :], per block
        x_c = tl.where(local[None, :, None] == r, x_c - update[:, None, :], x_c)
    # back to [C, C]: row t's 16 values into its own block's columns
    x_rows = tl.reshape(x_c, (BLOCK_C, 1, 16))
    return _join_blocks(tl.reshape(tl.where(own, x_rows, 0.0), (BLOCK_C, BLOCK_C)), a, BLOCK_C, PRECISION)


@triton.jit
def _prepare_forward_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, la_ptr, w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, x_ptr,
    T, H, N, C, K, V,
    s_qb, s_qt, s_qh, s_qk, s_kb, s_kt, s_kh, s_kk, s_vb, s_vt, s_vh, s_vv,
    s_bb, s_bt, s_bh, s_ab, s_at, s_ah,
    PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, INVERSE: tl.constexpr,
):
    """Passes over blocks of ``BLOCK_D`` feature columns, so that only ``[C, C]`` tiles and one
    ``[C, BLOCK_D]`` block are live (fewer registers: more programs per SM): the keys and
    queries, summing ``K Kᵀ`` and ``Q Kᵀ`` and writing ``Qd``, ``Kd``; then, with ``X`` known,
    the keys again for ``W2`` and the values for ``W1``."""
    chunk = tl.program_id(0).to(tl.int64)  # outputs [B, H, N, C, ...], contiguous: chunk = (b H + h) N + n
    b, h, rows, t, in_c, valid = _chunk_rows(chunk, T, H, N, C, BLOCK_C)
    acc: tl.constexpr = x_ptr.dtype.element_ty  # W1 ... P may be stored in 16 bits, X is not
    beta, lam, lam_last, decay = _decays(beta_ptr, la_ptr, b, h, t, valid, s_bb, s_bt, s_bh, s_ab, s_at, s_ah,
                                         BLOCK_C, acc)
    from_start = tl.exp(lam)  # e^Λ
    to_end = tl.exp(lam_last - lam)  # e^{Λ_C − Λ}

    kk = tl.zeros((BLOCK_C, BLOCK_C), dtype=acc)
    qk = tl.zeros((BLOCK_C, BLOCK_C), dtype=acc)
    for d0 in tl.static_range(0, BLOCK_K, BLOCK_D):  # unrolled: see the module docstring
        k = _load_block(k_ptr, b, h, t, valid, s_kb, s_kt, s_kh, s_kk, d0, K, BLOCK_D, acc)
        q = _load_block(q_ptr, b, h, t, valid, s_qb, s_qt, s_qh, s_qk, d0, K, BLOCK_D, acc)
        kk += _dot(k, tl.trans(k), PRECISION)
        qk += _dot(q, tl.trans(k), PRECISION)
        _store_chunk_block(qd_ptr, q * from_start[:, None], chunk, rows, in_c, d0, C, K, BLOCK_D)  # Qd = diag(e^Λ) Q
        _store_chunk_block(kd_ptr, k * to_end[:, None], chunk, rows, in_c, d0, C, K, BLOCK_D)  # Kd = diag(e^{Λ_C − Λ}) K

    strict = rows[:, None] > rows[None, :]
    a = tl.where(strict, beta[:, None] * decay * kk, 0.0)  # A = diag(β) M ⊙ K Kᵀ
    if INVERSE == "blocks":
        x = _unit_lower_inverse_blocks(a, BLOCK_C, PRECISION)  # (I + A)⁻¹
    elif INVERSE == "compact":
        x = _unit_lower_inverse_compact(a, BLOCK_C, PRECISION)
    else:  # "rows"
        x = tl.trans(_unit_lower_inverse_t(a, BLOCK_C))
    mask_c = in_c[:, None] & in_c[None, :]
    off_c = chunk * C * C + rows[:, None] * C + rows[None, :]
    tl.store(p_ptr + off_c, decay * qk, mask=mask_c)  # P = M ⊙ Q Kᵀ
    # X on and below the diagonal, (M ⊙ K Kᵀ)ᵀ above it (M is zero there): the backward reads both
    tl.store(x_ptr + off_c, tl.where(rows[:, None] >= rows[None, :], x, tl.trans(decay * kk)), mask=mask_c)
    tl.store(g_ptr + chunk, tl.exp(lam_last))

    for d0 in tl.static_range(0, BLOCK_K, BLOCK_D):  # W2 = (I + A)⁻¹ diag(β e^Λ) K
        k = _load_block(k_ptr, b, h, t, valid, s_kb, s_kt, s_kh, s_kk, d0, K, BLOCK_D, acc)
        w2 = _dot(x, (beta * from_start)[:, None] * k, PRECISION)
        _store_chunk_block(w2_ptr, w2, chunk, rows, in_c, d0, C, K, BLOCK_D)
    for d0 in tl.static_range(0, BLOCK_V, BLOCK_D):  # W1 = (I + A)⁻¹ diag(β) V
        v = _load_block(v_ptr, b, h, t, valid, s_vb, s_vt, s_vh, s_vv, d0, V, BLOCK_D, acc)
        _store_chunk_block(w1_ptr, _dot(x, beta[:, None] * v, PRECISION), chunk, rows, in_c, d0, C, V, BLOCK_D)


@triton.jit
def _load_chunk_block(ptr, chunk, rows, in_c, d0, C, D, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Columns ``d0 .. d0 + BLOCK_D`` of chunk ``chunk`` of a contiguous ``[B, H, N, C, D]`` tensor, in ``ACC``."""
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = in_c[:, None] & (cols < D)[None, :]
    return tl.load(ptr + chunk * C * D + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_chunk_block(ptr, value, chunk, rows, in_c, d0, C, D, BLOCK_D: tl.constexpr):
    """``value`` into the block ``_load_chunk_block`` reads."""
    cols = d0 + tl.arange(0, BLOCK_D)
    tl.store(ptr + chunk * C * D + rows[:, None] * D + cols[None, :], value, mask=in_c[:, None] & (cols < D)[None, :])


@triton.jit
def _store_block(ptr, value, b, h, t, valid, o_b, o_t, o_h, d0, D, BLOCK_D: tl.constexpr):
    """Columns ``d0 .. d0 + BLOCK_D`` of the chunk's rows of a contiguous ``[B, T, H, D]`` tensor."""
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (cols < D)[None, :]
    tl.store(ptr + b * o_b + h * o_h + t[:, None] * o_t + cols[None, :], value, mask=mask)


@triton.jit
def _prepare_backward_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, la_ptr, x_ptr, p_ptr, dw1_ptr, dw2_ptr, dqd_ptr, dkd_ptr, dp_ptr, dg_ptr,
    dv_ptr, dbeta_ptr, dla_ptr, gkk_ptr, gqk_ptr,
    T, H, N, C, K, V,
    s_qb, s_qt, s_qh, s_qk, s_kb, s_kt, s_kh, s_kk, s_vb, s_vt, s_vh, s_vv,
    s_bb, s_bt, s_bh, s_ab, s_at, s_ah,
    o_vb, o_vt, o_vh, o_bb, o_bt, o_bh,
    PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Everything but ``dq`` and ``dk``, in two passes over blocks of ``BLOCK_D`` feature
    columns (so that no ``[C, K]`` or ``[C, V]`` operand is whole on chip): the values, whose
    gradient is final at once; the keys and queries, summing ``dX``. Then the ``[C, C]``
    part, from ``M ⊙ K Kᵀ`` and ``P`` as the forward stored them (no ``K Kᵀ`` or ``Q Kᵀ``
    summed again), which writes the gradients of ``K Kᵀ`` and ``Q Kᵀ`` for
    ``_prepare_backward_keys_kernel``."""
    chunk = tl.program_id(0).to(tl.int64)  # X and the incoming gradients [B, H, N, C, ...], contiguous
    b, h, rows, t, in_c, valid = _chunk_rows(chunk, T, H, N, C, BLOCK_C)
    acc: tl.constexpr = x_ptr.dtype.element_ty
    beta, lam, lam_last, decay = _decays(beta_ptr, la_ptr, b, h, t, valid, s_bb, s_bt, s_bh, s_ab, s_at, s_ah,
                                         BLOCK_C, acc)
    from_start = tl.exp(lam)  # e^Λ
    to_end = tl.exp(lam_last - lam)  # e^{Λ_C − Λ}
    mask_c = in_c[:, None] & in_c[None, :]
    off_c = chunk * C * C + rows[:, None] * C + rows[None, :]
    packed_t = tl.trans(tl.load(x_ptr + off_c, mask=mask_c, other=0.0))  # [X | (M ⊙ K Kᵀ)ᵀ]ᵀ
    x_t = tl.where(rows[:, None] <= rows[None, :], packed_t, 0.0)  # Xᵀ

    # W1 = X diag(β) V: dX += dW1 (diag(β) V)ᵀ, d(diag(β) V) = Xᵀ dW1
    grad_x = tl.zeros((BLOCK_C, BLOCK_C), dtype=acc)
    grad_beta = tl.zeros((BLOCK_C,), dtype=acc)
    for d0 in range(0, BLOCK_V, BLOCK_D):
        v = _load_block(v_ptr, b, h, t, valid, s_vb, s_vt, s_vh, s_vv, d0, V, BLOCK_D, acc)
        dw1 = _load_chunk_block(dw1_ptr, chunk, rows, in_c, d0, C, V, BLOCK_D, acc)
        grad_x += _dot(dw1, tl.trans(beta[:, None] * v), PRECISION)
        grad_r1 = _dot(x_t, dw1, PRECISION)
        grad_beta += tl.sum(grad_r1 * v, 1)
        _store_block(dv_ptr, beta[:, None] * grad_r1, b, h, t, valid, o_vb, o_vt, o_vh, d0, V, BLOCK_D)

    # W2 = X diag(β e^Λ) K, Qd = diag(e^Λ) Q, Kd = diag(e^{Λ_C − Λ}) K: the sums over K
    through_r2 = tl.zeros((BLOCK_C,), dtype=acc)  # d(β e^Λ)
    through_qd = tl.zeros((BLOCK_C,), dtype=acc)
    through_kd = tl.zeros((BLOCK_C,), dtype=acc)
    for d0 in range(0, BLOCK_K, BLOCK_D):  # a loop, pipelined: no K Kᵀ, Q Kᵀ pair here (module docstring)
        k = _load_block(k_ptr, b, h, t, valid, s_kb, s_kt, s_kh, s_kk, d0, K, BLOCK_D, acc)
        q = _load_block(q_ptr, b, h, t, valid, s_qb, s_qt, s_qh, s_qk, d0, K, BLOCK_D, acc)
        dw2 = _load_chunk_block(dw2_ptr, chunk, rows, in_c, d0, C, K, BLOCK_D, acc)
        grad_x += _dot(dw2, tl.trans((beta * from_start)[:, None] * k), PRECISION)
        through_r2 += tl.sum(_dot(x_t, dw2, PRECISION) * k, 1)
        through_qd += tl.sum(_load_chunk_block(dqd_ptr, chunk, rows, in_c, d0, C, K, BLOCK_D, acc) * q, 1)
        through_kd += tl.sum(_load_chunk_block(dkd_ptr, chunk, rows, in_c, d0, C, K, BLOCK_D, acc) * k, 1)

    # the [C, C] part: A = diag(β) M ⊙ K Kᵀ through X = (I + A)⁻¹ (dA = −Xᵀ dX Xᵀ), P = M ⊙ Q Kᵀ
    strict = rows[:, None] > rows[None, :]
    grad_a = tl.where(strict, -_dot(_dot(x_t, grad_x, PRECISION), x_t, PRECISION), 0.0)
    grad_kk = grad_a * beta[:, None] * decay
    grad_kk += tl.trans(grad_kk)  # K Kᵀ is symmetric in K
    grad_p = tl.load(dp_ptr + off_c, mask=mask_c, other=0.0).to(acc)
    tl.store(gkk_ptr + off_c, grad_kk, mask=mask_c)
    tl.store(gqk_ptr + off_c, grad_p * decay, mask=mask_c)
    decayed_kk = tl.where(strict, packed_t, 0.0)  # M ⊙ K Kᵀ below the diagonal
    attn = tl.load(p_ptr + off_c, mask=mask_c, other=0.0).to(acc)  # P
    grad_exponent = grad_a * beta[:, None] * decayed_kk + grad_p * attn  # through M_ts = e^{Λ_t − Λ_s}: A and P
    grad_beta += through_r2 * from_start + tl.sum(grad_a * decayed_kk, 1)
    grad_lam = (through_r2 * beta + through_qd) * from_start - through_kd * to_end
    grad_lam += tl.sum(grad_exponent, 1) - tl.sum(grad_exponent, 0)
    grad_lam_last = tl.sum(through_kd * to_end, 0) + tl.load(dg_ptr + chunk).to(acc) * tl.exp(lam_last)

    # Λ_t = Σ_{j≤t} log α_j and Λ_C = Σ_j log α_j
    grad_la = tl.cumsum(grad_lam, 0, reverse=True) + grad_lam_last
    tl.store(dbeta_ptr + b * o_bb + h * o_bh + t * o_bt, grad_beta, mask=valid)
    tl.store(dla_ptr + b * o_bb + h * o_bh + t * o_bt, grad_la, mask=valid)


@triton.jit
def _prepare_backward_keys_kernel(
    q_ptr, k_ptr, beta_ptr, la_ptr, x_ptr, gkk_ptr, gqk_ptr, dw2_ptr, dqd_ptr, dkd_ptr, dq_ptr, dk_ptr,
    T, H, N, C, K,
    s_qb, s_qt, s_qh, s_qk, s_kb, s_kt, s_kh, s_kk, s_bb, s_bt, s_bh, s_ab, s_at, s_ah,
    o_qb, o_qt, o_qh,
    PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dq`` and ``dk``, ``BLOCK_D`` feature columns a program (a two-dimensional grid
    flattened, the chunk's column blocks side by side): products of the ``[C, C]``
    gradients ``_prepare_backward_kernel`` wrote (and ``Xᵀ``) with the chunk's keys and
    queries, no sum across column blocks, so no program waits on another's columns."""
    pid = tl.program_id(0).to(tl.int64)
    column_blocks = tl.cdiv(K, BLOCK_D)
    chunk, d0 = pid // column_blocks, (pid % column_blocks) * BLOCK_D
    b, h, rows, t, in_c, valid = _chunk_rows(chunk, T, H, N, C, BLOCK_C)
    acc: tl.constexpr = x_ptr.dtype.element_ty
    beta, lam, lam_last = _gates(beta_ptr, la_ptr, b, h, t, valid, s_bb, s_bt, s_bh, s_ab, s_at, s_ah, acc)
    from_start = tl.exp(lam)  # e^Λ
    to_end = tl.exp(lam_last - lam)  # e^{Λ_C − Λ}
    mask_c = in_c[:, None] & in_c[None, :]
    off_c = chunk * C * C + rows[:, None] * C + rows[None, :]
    x_t = tl.trans(tl.load(x_ptr + off_c, mask=mask_c & (rows[:, None] >= rows[None, :]), other=0.0))  # Xᵀ
    grad_kk = tl.load(gkk_ptr + off_c, mask=mask_c, other=0.0).to(acc)
    grad_qk = tl.load(gqk_ptr + off_c, mask=mask_c, other=0.0).to(acc)

    k = _load_block(k_ptr, b, h, t, valid, s_kb, s_kt, s_kh, s_kk, d0, K, BLOCK_D, acc)
    q = _load_block(q_ptr, b, h, t, valid, s_qb, s_qt, s_qh, s_qk, d0, K, BLOCK_D, acc)
    dw2 = _load_chunk_block(dw2_ptr, chunk, rows, in_c, d0, C, K, BLOCK_D, acc)
    dqd = _load_chunk_block(dqd_ptr, chunk, rows, in_c, d0, C, K, BLOCK_D, acc)
    dkd = _load_chunk_block(dkd_ptr, chunk, rows, in_c, d0, C, K, BLOCK_D, acc)
    grad_q = _dot(grad_qk, k, PRECISION) + dqd * from_start[:, None]
    grad_k = (_dot(grad_kk, k, PRECISION) + _dot(tl.trans(grad_qk), q, PRECISION)
              + (beta * from_start)[:, None] * _dot(x_t, dw2, PRECISION) + dkd * to_end[:, None])
    _store_block(dq_ptr, grad_q, b, h, t, valid, o_qb, o_qt, o_qh, d0, K, BLOCK_D)
    _store_block(dk_ptr, grad_k, b, h, t, valid, o_qb, o_qt, o_qh, d0, K, BLOCK_D)


INVERSES = ("blocks", "compact", "rows")


def pick_config(size: int, key_dim: int, value_dim: int, *, backward: bool = False, bf16_grads: bool = False,
                interpret: bool = False, config: dict | None = None) -> dict:
    """Launch config of the forward kernel, or with ``backward`` the backward's (``config``
    overrides any entry of either): a whole chunk per program, padded to powers of two of
    at least 16 (``tl.dot``'s smallest tile). ``bf16_grads``: the backward's incoming
    gradients are bf16, so its products are too (module docstring)."""
    block_k, block_v = max(16, triton.next_power_of_2(key_dim)), max(16, triton.next_power_of_2(value_dim))
    cfg = {
        "BLOCK_C": max(16, triton.next_power_of_2(size)),
        "BLOCK_K": block_k,
        "BLOCK_V": block_v,
        # feature columns per pass: whole [C, 128] operands do not fit the backward in sm_90's
        # shared memory, and cost the forward registers (docs/notes/delta-kernel.md)
        "BLOCK_D": min(32, max(block_k, block_v)),
        # 4 warps, two programs an SM (docs/notes/benchmark-history.md, "The `delta` op against fla")
        "num_warps": 4,
        "PRECISION": "ieee" if interpret else default_precision(),
    }
    if backward:
        # the kernel of dq and dk: its columns a program and warps (docs/notes/delta-kernel.md);
        # 16 where 32 would be the whole key, as 32 fails with bf16 products (below)
        cfg.update(KEYS_BLOCK_D=16 if block_k == 32 else min(64, block_k), KEYS_WARPS=4)
    if backward and bf16_grads:
        # 1.19-1.22x faster than tf32 on an H200 at 16 heads of 128 (docs/benchmarks.md and
        # docs/notes/benchmark-history.md, "The `delta` op against fla")
        cfg["PRECISION"] = "bf16-interpret" if interpret else "bf16"
    if not backward:
        # how the forward inverts I + A: "compact" (the diagonal 16-row blocks by substitution
        # in a compact layout on the CUDA cores, then C/16 joining products: 1.14x faster
        # than "blocks" on an H200), "blocks" (the diagonal blocks by substitution as
        # products on the tensor cores, 19 products at C = 64) or "rows" (forward
        # substitution over the whole chunk, C - 1 serial steps)
        cfg["INVERSE"] = "compact"
    cfg.update(config or {})
    # a benchmark's override of both kernels: each keeps its own entries
    for key in ("INVERSE",) if backward else ("KEYS_BLOCK_D", "KEYS_WARPS"):
        cfg.pop(key, None)
    if not backward and cfg["INVERSE"] not in INVERSES:
        raise ValueError(f"INVERSE must be one of {INVERSES}, got {cfg['INVERSE']!r}")
    if backward and cfg["PRECISION"] == "bf16" and cfg["KEYS_BLOCK_D"] == 32:
        # wrong dq, dk (and once an illegal memory access) on an H200 with Triton 3.6, where
        # 16, 64 and 128 columns are right (docs/notes/delta-kernel.md)
        raise ValueError("the dq, dk kernel gives wrong results at KEYS_BLOCK_D=32 with bf16 products on "
                         "Triton 3.6; use 16, 64 or 128")
    return cfg


launch_config = cached_config(pick_config)


def _input_strides(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor) -> tuple[int, ...]:
    return (*q.stride(), *k.stride(), *v.stride(), *beta.stride(), *log_alpha.stride())


def prepare_forward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, chunk_size: int,
                    acc: torch.dtype, intermediates: torch.dtype | None = None, *, out: tuple[Tensor, ...] | None = None,
                    config: dict | None = None) -> tuple[Tensor, ...]:
    """``(W1, W2, Qd, Kd, P, g, X)`` as ``mmrec::delta_chunk_prepare``, one launch: computed in
    ``acc``, the first five stored in ``intermediates`` (None: ``acc``); ``out`` takes
    preallocated contiguous outputs, ``config`` overrides the launch config."""
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    size = min(chunk_size, length)
    chunks = -(-length // size)
    lead = (batch, heads, chunks, size)
    if out is None:
        kw, stored = {"dtype": acc, "device": v.device}, {"dtype": intermediates or acc, "device": v.device}
        out = (torch.empty(*lead, value_dim, **stored), *(torch.empty(*lead, key_dim, **stored) for _ in range(3)),
               torch.empty(*lead, size, **stored), torch.empty(*lead[:3], **kw), torch.empty(*lead, size, **kw))
    w1, w2, qd, kd, p, g, x = out
    if g.numel() == 0:
        return w1, w2, qd, kd, p, g, x
    cfg = launch_config(size, key_dim, value_dim, interpret=not v.is_cuda, config=config)
    _prepare_forward_kernel[(batch * heads * chunks,)](
        q, k, v, beta, log_alpha, w1, w2, qd, kd, p, g, x, length, heads, chunks, size, key_dim, value_dim,
        *_input_strides(q, k, v, beta, log_alpha), **cfg)
    return w1, w2, qd, kd, p, g, x


def prepare_backward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, packed: Tensor,
                     attn: Tensor, grads: tuple[Tensor, ...], *, out: tuple[Tensor, ...] | None = None,
                     config: dict | None = None) -> tuple[Tensor, ...]:
    """``(dq, dk, dv, dβ, d log α)``, contiguous, in the inputs' dtypes, from the gradients of
    ``(W1, W2, Qd, Kd, P, g)`` (read in their dtypes, 16-bit ones too, and summed in ``X``'s)
    and what the forward wrote: ``packed``, its last output (``X`` on and below the
    diagonal, ``(M ⊙ K Kᵀ)ᵀ`` above it; a plain ``X`` would give wrong ``dβ``, ``d log α``),
    and ``attn`` (``P``); two launches. ``out`` takes preallocated contiguous outputs,
    ``config`` as in the forward."""
    batch, length, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    size = packed.shape[-1]
    chunks = packed.shape[2]
    outs = out or tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v, beta, log_alpha))
    if not all(o.is_contiguous() for o in outs):
        raise ValueError("prepare_backward writes contiguous gradients: pass contiguous out tensors")
    if packed.numel() == 0:
        return tuple(o.zero_() for o in outs)
    grads = tuple(g.contiguous() for g in grads)
    cfg = dict(launch_config(size, key_dim, value_dim, backward=True, bf16_grads=grads[0].dtype == torch.bfloat16,
                             interpret=not v.is_cuda, config=config))
    keys_cfg = {"BLOCK_C": cfg["BLOCK_C"], "PRECISION": cfg["PRECISION"],
                "BLOCK_D": cfg.pop("KEYS_BLOCK_D"), "num_warps": cfg.pop("KEYS_WARPS")}
    # the gradients of K Kᵀ and Q Kᵀ [2, B, H, N, C, C], from the first kernel to the second, in
    # bf16 when the products round them to bf16 anyway
    grad_kk_qk = torch.empty((2, *packed.shape), device=packed.device,
                             dtype=torch.bfloat16 if cfg["PRECISION"].startswith("bf16") else packed.dtype)
    grad_q, grad_k, grad_v, grad_beta, grad_log_alpha = outs
    packed = packed.contiguous()
    qk_strides, gate_strides = (*q.stride(), *k.stride()), (*beta.stride(), *log_alpha.stride())
    _prepare_backward_kernel[(batch * heads * chunks,)](
        q, k, v, beta, log_alpha, packed, attn.contiguous(), *grads, grad_v, grad_beta, grad_log_alpha, *grad_kk_qk,
        length, heads, chunks, size, key_dim, value_dim, *qk_strides, *v.stride(), *gate_strides,
        *grad_v.stride()[:3], *grad_beta.stride(), **cfg)
    _prepare_backward_keys_kernel[(batch * heads * chunks * triton.cdiv(key_dim, keys_cfg["BLOCK_D"]),)](
        q, k, beta, log_alpha, packed, *grad_kk_qk, grads[1], grads[2], grads[3], grad_q, grad_k,
        length, heads, chunks, size, key_dim, *qk_strides, *gate_strides, *grad_q.stride()[:3], **keys_cfg)
    return outs

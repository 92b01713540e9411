"""Triton kernels for ``mmrec::delta_chunk_scan`` and ``mmrec::delta_chunk_scan_backward``.

The loop over chunks (``chunk_scan.py``) is sequential in the chunk index but independent
across (batch, head) pairs and across columns of ``V``: every product has ``V`` as its free
column index (``W2 S``, ``Qd S``, ``P U``, ``Kdᵀ U``). So each program
takes one (batch·head, block of ``BLOCK_V`` value columns), keeps its ``[K, BLOCK_V]``
slice of the state on chip in the accumulation dtype for the whole sequence, and walks the
chunks, doing each chunk's four products with ``tl.dot``. Per chunk the forward reads
``W1``, ``W2``, ``Qd``, ``Kd``, ``P`` and ``g`` and writes ``O`` and, when a backward will
follow (``KEEP_STATES``), the chunk's starting state; one launch covers a layer.

With ``OUTPUT="after"`` (a launch option) the loop carries only the state (two products
per chunk, ``W2 S`` and ``Kdᵀ U``) and stores every chunk's starting state; a second
kernel, parallel over chunks, then writes ``O``. The sequential part is shorter; the
output kernel recomputes ``U`` and reads the states back.

The backward kernel runs the adjoint recurrence the other way, ``dU_n = P_nᵀ dO_n +
Kd_n dS``, ``dS ← Qd_nᵀ dO_n + g_n dS − W2_nᵀ dU_n``, with ``dS`` ``[K, BLOCK_V]`` on chip:
per column like the forward (it needs no state). It writes ``dU_n`` and each ``dS_{n+1}``;
the gradients that sum over ``V`` (``dW2``, ``dQd``, ``dKd``, ``dP``, ``dg``) are then
batched products over all chunks at once, in PyTorch (``chunk_scan.py``).

Products take fp32 operands at ``PRECISION`` (``tl.dot``'s ``input_precision``), by
default from ``torch.get_float32_matmul_precision()`` (``default_precision``):
``"tf32x3"``, about fp32 accuracy from three tf32 products on the tensor cores, or
``"tf32"``, one product (relative error about 1e-3 per product), which needs far fewer
registers. Three more for tuning: ``"bf16"``, one product of operands rounded to bf16
(8 bits of mantissa, as fla's kernels multiply; twice tf32's rate), ``"bf16x3"``, each fp32
operand split into two bf16 parts and three bf16 products (about 16 bits of mantissa:
errors near 1e-4 in tests, with half tf32x3's registers for the split operands), and
``"ieee"``, exact fp32 on the CUDA cores. The stored intermediates (``W1``, ``W2``,
``Qd``, ``Kd``, ``P``, and the outputs ``O``, ``S_n``, ``dU``, ``dS_{n+1}``) may instead be
bf16, as fla stores them: half the bytes, and every product one 16-bit product
(the state or adjoint rounded for it), and the loop software-pipelined: the next chunks'
operands load while this one's products run, which the halved bytes leave shared memory
for (``pick_config``). The state and every sum stay fp32
(float64 for float64 inputs, which run under the interpreter in tests; on CUDA the op runs
those through cuBLAS). Sizes that are not
powers of two (or below ``tl.dot``'s 16) are padded on chip with masked loads and stores.
The kernels read and write the contiguous layouts, which ``mmrec::delta_chunk_prepare``
produces, and derive every stride from the shapes: a launch then passes 14 arguments (20
backwards, where ``dO`` keeps its strides) instead of 61, which is most of the launch's host
time. The launchers copy an input in another layout first. With ``TRITON_INTERPRET=1`` they
run on CPU tensors, which is how the CPU tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmrec.ops.launch import cached_config, device_sm_count, float32_matmul_precision


@triton.jit
def _split_bf16(x, UPCAST: tl.constexpr):
    """fp32 ``x`` as ``hi + lo``, two bf16 parts (about 16 bits of mantissa); with
    ``UPCAST`` their values as fp32 (the interpreter's 16-bit ``tl.dot`` is not exact)."""
    hi = x.to(tl.bfloat16)
    lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
    if UPCAST:
        return hi.to(tl.float32), lo.to(tl.float32)
    return hi, lo


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` with fp32 accumulation. A 16-bit operand makes it a 16-bit product, the other
    operand rounded to that dtype (stored intermediates in bf16: module docstring; under
    the interpreter the rounded operands are multiplied exactly);
    fp32 operands at ``PRECISION``. (The dtype tests are inline: they must stay compile-time.)"""
    if a.dtype == tl.bfloat16 or a.dtype == tl.float16:
        b = b.to(a.dtype)
    elif b.dtype == tl.bfloat16 or b.dtype == tl.float16:
        a = a.to(b.dtype)
    if a.dtype == tl.bfloat16 or a.dtype == tl.float16:
        if PRECISION == "ieee" or PRECISION == "bf16-interpret" or PRECISION == "bf16x3-interpret":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)
    elif a.dtype != tl.float32:  # float64, under the interpreter
        return tl.dot(a, b)
    elif PRECISION == "bf16":  # one bf16 product: half tf32's operand bytes, twice its rate
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PRECISION == "bf16-interpret":  # the same rounding, multiplied exactly (see _split_bf16)
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32))
    elif PRECISION == "bf16x3" or PRECISION == "bf16x3-interpret":
        a_hi, a_lo = _split_bf16(a, PRECISION == "bf16x3-interpret")
        b_hi, b_lo = _split_bf16(b, PRECISION == "bf16x3-interpret")
        acc = tl.dot(a_lo, b_hi)  # the small terms first; lo x lo left out
        acc = tl.dot(a_hi, b_lo, acc)
        return tl.dot(a_hi, b_hi, acc)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_transposed(ptr, C, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, FROM_MEMORY: tl.constexpr):
    """A chunk's ``[C, D]`` block of a contiguous layout (``ptr`` at its start) as its
    transpose ``[BLOCK_D, BLOCK_C]``: read in that order from memory with ``FROM_MEMORY``,
    else loaded and transposed on chip (``tl.trans``). 16-bit blocks take the first way: a
    bf16 ``tl.trans`` operand of ``tl.dot`` gave wrong products and illegal memory accesses
    on sm_90 with Triton 3.6 (docs/notes/delta-kernel.md)."""
    rows = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_D)
    if FROM_MEMORY:
        mask = (cols < D)[:, None] & (rows < C)[None, :]
        return tl.load(ptr + cols[:, None] + rows[None, :] * D, mask=mask, other=0.0)
    mask = (rows < C)[:, None] & (cols < D)[None, :]
    return tl.trans(tl.load(ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0))


@triton.jit
def _forward_chunk(n, s, w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, o_ptr, st_ptr,
                   off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv, C, K, V,
                   KEEP_STATES: tl.constexpr, WRITE_O: tl.constexpr, PRECISION: tl.constexpr,
                   TRANSPOSED_LOADS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """One chunk: store ``S_n`` (with ``KEEP_STATES``), write ``O_n`` (with ``WRITE_O``),
    return ``S_{n+1}``."""
    n = tl.full((), 0, tl.int64) + n  # 64-bit offsets
    if KEEP_STATES:
        tl.store(st_ptr + n * K * V + off_kv, s.to(st_ptr.dtype.element_ty), mask=mask_kv)
    w1 = tl.load(w1_ptr + n * C * V + off_cv, mask=mask_cv, other=0.0)  # [C, BV]
    w2 = tl.load(w2_ptr + n * C * K + off_ck, mask=mask_ck, other=0.0)  # [C, K]
    kd_t = _load_transposed(kd_ptr + n * C * K, C, K, BLOCK_C, BLOCK_K, TRANSPOSED_LOADS)  # [K, C]
    g = tl.load(g_ptr + n)
    u = w1 - _dot(w2, s, PRECISION)  # U = W1 − W2 S
    if WRITE_O:
        qd = tl.load(qd_ptr + n * C * K + off_ck, mask=mask_ck, other=0.0)  # [C, K]
        p = tl.load(p_ptr + n * C * C + off_cc, mask=mask_cc, other=0.0)  # [C, C]
        o = _dot(qd, s, PRECISION) + _dot(p, u, PRECISION)  # O = Qd S + P U
        tl.store(o_ptr + n * C * V + off_cv, o.to(o_ptr.dtype.element_ty), mask=mask_cv)
    return g * s + _dot(kd_t, u, PRECISION)  # S ← g S + Kdᵀ U


@triton.jit
def _tile_offsets(v_block, C, K, V, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """Offsets and masks of one program's tiles in a chunk of the contiguous layouts
    ``[.., C, V]`` (its block ``v_block`` of ``BLOCK_V`` columns), ``[.., C, K]``, ``[.., C, C]``
    and ``[.., K, V]``."""
    rows = tl.arange(0, BLOCK_C)  # positions in the chunk
    keys = tl.arange(0, BLOCK_K)
    cols = v_block * BLOCK_V + tl.arange(0, BLOCK_V)  # this program's value columns
    mask_c, mask_k, mask_v = rows < C, keys < K, cols < V
    off_cv, mask_cv = rows[:, None] * V + cols[None, :], mask_c[:, None] & mask_v[None, :]
    off_ck, mask_ck = rows[:, None] * K + keys[None, :], mask_c[:, None] & mask_k[None, :]
    off_cc, mask_cc = rows[:, None] * C + rows[None, :], mask_c[:, None] & mask_c[None, :]
    off_kv, mask_kv = keys[:, None] * V + cols[None, :], mask_k[:, None] & mask_v[None, :]
    return off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv


@triton.jit
def _forward_kernel(
    w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, s0_ptr, o_ptr, sl_ptr, st_ptr, N, C, K, V,
    KEEP_STATES: tl.constexpr, WRITE_O: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
    TRANSPOSED_LOADS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)  # batch element · heads + head: every tensor is contiguous [B, H, ...]
    off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv = _tile_offsets(tl.program_id(0), C, K, V, BLOCK_C, BLOCK_K, BLOCK_V)
    w1_ptr += bh * N * C * V
    w2_ptr += bh * N * C * K
    qd_ptr += bh * N * C * K
    kd_ptr += bh * N * C * K
    p_ptr += bh * N * C * C
    g_ptr += bh * N
    o_ptr += bh * N * C * V
    st_ptr += bh * N * K * V

    s = tl.load(s0_ptr + bh * K * V + off_kv, mask=mask_kv, other=0.0).to(sl_ptr.dtype.element_ty)
    if STAGES > 0:  # software-pipelined: the next chunks' loads in flight during this one's products
        for n in tl.range(0, N, num_stages=STAGES):
            s = _forward_chunk(n, s, w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, o_ptr, st_ptr,
                               off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv, C, K, V,
                               KEEP_STATES, WRITE_O, PRECISION, TRANSPOSED_LOADS, BLOCK_C, BLOCK_K)
    else:
        n = 0
        while n < N:  # not range(): Triton's interpreter can't take it a scalar under NumPy >= 2.4
            s = _forward_chunk(n, s, w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, o_ptr, st_ptr,
                               off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv, C, K, V,
                               KEEP_STATES, WRITE_O, PRECISION, TRANSPOSED_LOADS, BLOCK_C, BLOCK_K)
            n += 1
    tl.store(sl_ptr + bh * K * V + off_kv, s.to(sl_ptr.dtype.element_ty), mask=mask_kv)


@triton.jit
def _output_kernel(
    w1_ptr, w2_ptr, qd_ptr, p_ptr, st_ptr, o_ptr, C, K, V,
    PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``O_n = Qd_n S_n + P_n (W1_n − W2_n S_n)`` for every chunk at once, from the states
    the forward kernel stored (``OUTPUT="after"``): one program per (chunk, column block)."""
    chunk = tl.program_id(0).to(tl.int64)  # (b·H + h)·N + n: every tensor is contiguous [B, H, N, ...]
    off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv = _tile_offsets(tl.program_id(1), C, K, V, BLOCK_C, BLOCK_K, BLOCK_V)
    s = tl.load(st_ptr + chunk * K * V + off_kv, mask=mask_kv, other=0.0)  # S_n [K, BV]
    w1 = tl.load(w1_ptr + chunk * C * V + off_cv, mask=mask_cv, other=0.0)
    w2 = tl.load(w2_ptr + chunk * C * K + off_ck, mask=mask_ck, other=0.0)
    qd = tl.load(qd_ptr + chunk * C * K + off_ck, mask=mask_ck, other=0.0)
    p = tl.load(p_ptr + chunk * C * C + off_cc, mask=mask_cc, other=0.0)
    u = w1 - _dot(w2, s, PRECISION)
    o = _dot(qd, s, PRECISION) + _dot(p, u, PRECISION)
    tl.store(o_ptr + chunk * C * V + off_cv, o.to(o_ptr.dtype.element_ty), mask=mask_cv)


@triton.jit
def _adjoint_chunk(n, ds, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, do_ptr, du_ptr, dsn_ptr, s_don, off_do,
                   off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv, C, K, V,
                   HAS_DO: tl.constexpr, PRECISION: tl.constexpr, TRANSPOSED_LOADS: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """One chunk backwards: store ``dS_{n+1}`` (``ds``) and ``dU_n``, return ``dS_n``."""
    n = tl.full((), 0, tl.int64) + n  # 64-bit offsets
    tl.store(dsn_ptr + n * K * V + off_kv, ds.to(dsn_ptr.dtype.element_ty), mask=mask_kv)
    w2_t = _load_transposed(w2_ptr + n * C * K, C, K, BLOCK_C, BLOCK_K, TRANSPOSED_LOADS)  # [K, C]
    kd = tl.load(kd_ptr + n * C * K + off_ck, mask=mask_ck, other=0.0)  # [C, K]
    g = tl.load(g_ptr + n)
    du = _dot(kd, ds, PRECISION)  # dU = Kd dS (+ Pᵀ dO)
    ds = g * ds
    if HAS_DO:
        do = tl.load(do_ptr + n * s_don + off_do, mask=mask_cv, other=0.0)  # dO_n [C, BV]
        qd_t = _load_transposed(qd_ptr + n * C * K, C, K, BLOCK_C, BLOCK_K, TRANSPOSED_LOADS)  # [K, C]
        p_t = _load_transposed(p_ptr + n * C * C, C, C, BLOCK_C, BLOCK_C, TRANSPOSED_LOADS)  # [C, C]
        du += _dot(p_t, do, PRECISION)
        ds += _dot(qd_t, do, PRECISION)
    tl.store(du_ptr + n * C * V + off_cv, du.to(du_ptr.dtype.element_ty), mask=mask_cv)
    return ds - _dot(w2_t, du, PRECISION)  # dS_n = Qdᵀ dO + g dS − W2ᵀ dU


@triton.jit
def _adjoint_kernel(
    w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, do_ptr, dsl_ptr, du_ptr, dsn_ptr, ds0_ptr, H, N, C, K, V,
    s_dob, s_doh, s_don, s_doc, s_dov,  # dO keeps its strides: autograd often hands it over as a view
    HAS_DO: tl.constexpr, HAS_DSL: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
    TRANSPOSED_LOADS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)  # batch element · heads + head: every tensor but dO is contiguous [B, H, ...]
    off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv = _tile_offsets(tl.program_id(0), C, K, V, BLOCK_C, BLOCK_K, BLOCK_V)
    w2_ptr += bh * N * C * K
    qd_ptr += bh * N * C * K
    kd_ptr += bh * N * C * K
    p_ptr += bh * N * C * C
    g_ptr += bh * N
    off_do = off_cv
    if HAS_DO:
        do_ptr += (bh // H) * s_dob + (bh % H) * s_doh
        rows = tl.arange(0, BLOCK_C)
        cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        off_do = rows[:, None] * s_doc + cols[None, :] * s_dov
    du_ptr += bh * N * C * V
    dsn_ptr += bh * N * K * V

    acc: tl.constexpr = ds0_ptr.dtype.element_ty  # the adjoint's dtype, the state's
    if HAS_DSL:
        ds = tl.load(dsl_ptr + bh * K * V + off_kv, mask=mask_kv, other=0.0).to(acc)
    else:
        ds = tl.zeros((BLOCK_K, BLOCK_V), dtype=acc)
    if STAGES > 0:
        for i in tl.range(0, N, num_stages=STAGES):
            ds = _adjoint_chunk(N - 1 - i, ds, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, do_ptr, du_ptr, dsn_ptr, s_don, off_do,
                                off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv, C, K, V,
                                HAS_DO, PRECISION, TRANSPOSED_LOADS, BLOCK_C, BLOCK_K)
    else:
        n = N - 1
        while n >= 0:  # not range(), as in the forward
            ds = _adjoint_chunk(n, ds, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, do_ptr, du_ptr, dsn_ptr, s_don, off_do,
                                off_cv, off_ck, off_cc, off_kv, mask_cv, mask_ck, mask_cc, mask_kv, C, K, V,
                                HAS_DO, PRECISION, TRANSPOSED_LOADS, BLOCK_C, BLOCK_K)
            n -= 1
    tl.store(ds0_ptr + bh * K * V + off_kv, ds.to(ds0_ptr.dtype.element_ty), mask=mask_kv)


def default_precision() -> str:
    """``tl.dot``'s ``input_precision`` for fp32 products, from PyTorch's own switch for
    them (``torch.set_float32_matmul_precision``, which also governs cuBLAS in the rest of
    the chunked form): ``"highest"`` (PyTorch's default) gives ``"tf32x3"``, about fp32
    accuracy; ``"high"`` and ``"medium"`` give ``"tf32"``."""
    return "tf32x3" if float32_matmul_precision() == "highest" else "tf32"


# value columns per program when the programs fill the device even at that width (at
# least one per SM) and the products are one tf32 or bf16 product each: wider tiles then
# run faster, narrower ones when the device would sit half idle (docs/notes/benchmark-history.md, "The
# `delta` op against fla"); measured at keys of 128 only, so not taken for wider keys
WIDE_BLOCK_V = 64
PROGRAMS_PER_SM_FOR_WIDE = 1
# pipelining depth of the chunk loop on 16-bit operands, at keys of 128 or fewer (measured)
# and past them (2 stages on 8 warps, as before the rule: untested, since three stages of
# [64, 256] operands would not fit the shared memory)
STAGES_16_BIT = 3
STAGES_16_BIT_WIDE_KEYS = 2


def _value_columns(value_dim: int, block_k: int, precision: str, sequences: int, sm_count: int) -> int:
    """``BLOCK_V``: 32 columns (fewer for narrower values), or ``WIDE_BLOCK_V`` (see the comment above)."""
    wide_programs = sequences * triton.cdiv(value_dim, WIDE_BLOCK_V)
    if (value_dim >= WIDE_BLOCK_V and block_k <= 128 and precision in ("tf32", "bf16") and sm_count
            and wide_programs >= PROGRAMS_PER_SM_FOR_WIDE * sm_count):
        return WIDE_BLOCK_V
    return max(16, min(32, triton.next_power_of_2(value_dim)))


def pick_config(size: int, key_dim: int, value_dim: int, *, sequences: int = 0, sm_count: int = 0,
                operands_16_bit: bool = False, interpret: bool = False, config: dict | None = None) -> dict:
    """Launch config of either kernel; ``config`` overrides any entry. ``BLOCK_V``: value
    columns per program (from ``sequences``, batch x heads, and the device's ``sm_count``:
    ``_value_columns``, or for 16-bit stored operands the rule in the body: 64 when those
    programs fill the device, else 32); ``num_warps`` (4 for 16-bit operands in 32-column
    blocks at keys of 128 or fewer); ``STAGES``: software-pipelining depth of the chunk loop
    (0: none; 16-bit operands always pipelined, ``STAGES_16_BIT``); ``PRECISION``: ``tl.dot``'s ``input_precision`` for fp32 (exact
    fp32 under the interpreter, which ignores it, except ``"bf16"`` and ``"bf16x3"``,
    emulated there); ``OUTPUT``: where the forward computes ``O``."""
    block_k = max(16, triton.next_power_of_2(key_dim))
    # A program holds the chunk's [C, K] operands and a [K, BLOCK_V] fp32 state (or its
    # adjoint). 32 columns, and 8 warps past K = 64: with C = 64 on sm_90, neither kernel
    # spills with tf32 products (tf32x3, which splits every operand in registers, spills
    # a little at K = 64 and 1-2 KB a thread at K = 128); 64 columns spill more but, with
    # the device full, run faster.
    cfg = {
        "BLOCK_C": max(16, triton.next_power_of_2(size)),
        "BLOCK_K": block_k,
        "num_warps": 4 if block_k <= 64 else 8,
        "STAGES": 0,
        "PRECISION": "ieee" if interpret else default_precision(),
        # the forward's outputs: "loop", inside the sequential loop over chunks, or "after",
        # the loop carrying only the state and a kernel parallel over chunks writing them
        "OUTPUT": "loop",
        # the transposed operands (Kdᵀ; W2ᵀ, Qdᵀ, Pᵀ) read transposed from memory rather than
        # transposed on chip: needed for 16-bit ones (_load_transposed)
        "TRANSPOSED_LOADS": operands_16_bit,
    }
    cfg.update(config or {})
    if operands_16_bit:
        # always software-pipelined (the chunk loop is latency-bound, and 16-bit operands
        # leave the shared memory for it); 64 columns on 8 warps when those programs fill
        # the device, else 32 on 4 warps (docs/notes/delta-kernel.md, "Pipelined 16-bit scans");
        # past 128 keys 32 columns, 2 stages, 8 warps (untested on a GPU)
        narrow_keys = block_k <= 128
        wide = (narrow_keys and value_dim >= WIDE_BLOCK_V and sm_count
                and sequences * triton.cdiv(value_dim, WIDE_BLOCK_V) >= PROGRAMS_PER_SM_FOR_WIDE * sm_count)
        cfg.setdefault("BLOCK_V", WIDE_BLOCK_V if wide else 32)
        if "STAGES" not in (config or {}):
            cfg["STAGES"] = STAGES_16_BIT if narrow_keys else STAGES_16_BIT_WIDE_KEYS
        if "num_warps" not in (config or {}) and cfg["BLOCK_V"] < WIDE_BLOCK_V and narrow_keys:
            cfg["num_warps"] = 4
    cfg.setdefault("BLOCK_V", _value_columns(value_dim, cfg["BLOCK_K"], cfg["PRECISION"], sequences, sm_count))
    if cfg["OUTPUT"] not in ("loop", "after"):
        raise ValueError(f"OUTPUT must be 'loop' or 'after', got {cfg['OUTPUT']!r}")
    # bf16 operands on sm_90 with Triton 3.6 (docs/notes/delta-kernel.md): transposed on
    # chip, or in blocks of fewer than 64 value columns without pipelining, they gave wrong
    # products or illegal memory accesses; 64 columns, or 32 pipelined, were right
    if operands_16_bit and not cfg["TRANSPOSED_LOADS"] and not interpret:
        raise ValueError("16-bit operands need TRANSPOSED_LOADS: a transposed bf16 operand taken on chip gave wrong "
                         "products on sm_90 with Triton 3.6 (_load_transposed)")
    pipelined_32 = cfg["BLOCK_V"] >= 32 and cfg["STAGES"] >= 2
    if operands_16_bit and cfg["BLOCK_V"] < WIDE_BLOCK_V and not pipelined_32 and not interpret:
        raise ValueError(f"16-bit operands need BLOCK_V >= {WIDE_BLOCK_V}, or 32 with STAGES >= 2: narrower blocks "
                         "without pipelining gave wrong products and illegal memory accesses on sm_90 with Triton 3.6")
    if interpret and cfg["PRECISION"] in ("bf16", "bf16x3"):
        cfg["PRECISION"] += "-interpret"
    for name in ("BLOCK_C", "BLOCK_K", "BLOCK_V"):
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile), got {cfg[name]}")
    if cfg["BLOCK_C"] < size or cfg["BLOCK_K"] < key_dim:
        raise ValueError(f"BLOCK_C and BLOCK_K must cover the chunk ({size}) and the key size ({key_dim})")
    return cfg


launch_config = cached_config(pick_config)


def chunk_scan_forward(w1: Tensor, w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor, chunk_decay: Tensor,
                       initial_state: Tensor, *, keep_states: bool = True, out: tuple[Tensor, Tensor, Tensor] | None = None,
                       config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(O, final state, states)`` as ``mmrec::delta_chunk_scan``, one launch (two with
    ``OUTPUT="after"``); without ``keep_states`` no chunk's state is returned (``states``
    has 0 chunks). ``O`` and the states in ``w1``'s dtype (the stored intermediates'), the
    final state in ``initial_state``'s (the accumulation dtype).

    The kernel reads every tensor as contiguous (fewer launch arguments: the strides follow
    from the shapes), so an input in another layout is copied first; ``out`` takes
    preallocated contiguous outputs; ``config`` overrides the launch config (``pick_config``)."""
    batch, heads, chunks, size, value_dim = w1.shape
    key_dim = w2.shape[-1]
    inputs = [x.contiguous() for x in (w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state)]
    if out is None:
        o = torch.empty(w1.shape, dtype=w1.dtype, device=w1.device)
        final = torch.empty(initial_state.shape, dtype=initial_state.dtype, device=w1.device)
        states = torch.empty((batch, heads, chunks if keep_states else 0, key_dim, value_dim), dtype=w1.dtype,
                             device=w1.device)
    else:
        o, final, states = _checked_outputs(out, (tuple(w1.shape), tuple(initial_state.shape), (
            batch, heads, chunks if keep_states else 0, key_dim, value_dim)), (w1, initial_state, w1))
    if batch * heads * value_dim == 0:
        final.copy_(initial_state)
        return o, final, states
    cfg = launch_config(size, key_dim, value_dim, sequences=batch * heads, sm_count=device_sm_count(w1.device),
                        operands_16_bit=w1.element_size() == 2, interpret=not w1.is_cuda, config=config)
    output_after = cfg.pop("OUTPUT") == "after"
    stored = states  # the states the output kernel reads: kept even for inference
    if output_after and not keep_states:
        stored = torch.empty((batch, heads, chunks, key_dim, value_dim), dtype=w1.dtype, device=w1.device)
    v_blocks = triton.cdiv(value_dim, cfg["BLOCK_V"])
    _check_grid(batch * heads)
    _forward_kernel[(v_blocks, batch * heads)](
        *inputs, o, final, stored, chunks, size, key_dim, value_dim, KEEP_STATES=keep_states or output_after,
        WRITE_O=not output_after, **cfg)
    if output_after and chunks:
        w1, w2, q_decayed, _, attn = inputs[:5]
        out_cfg = {k: v for k, v in cfg.items() if k not in ("STAGES", "TRANSPOSED_LOADS")}
        if w1.element_size() == 2 and w1.is_cuda and out_cfg["BLOCK_V"] < WIDE_BLOCK_V:
            # no loop to pipeline, and unpipelined 16-bit blocks narrower than 64 columns went
            # wrong on sm_90 (pick_config): the output kernel takes 64 on 8 warps
            out_cfg.update(BLOCK_V=WIDE_BLOCK_V, num_warps=8)
        _output_kernel[(batch * heads * chunks, triton.cdiv(value_dim, out_cfg["BLOCK_V"]))](
            w1, w2, q_decayed, attn, stored, o, size, key_dim, value_dim, **out_cfg)
    return o, final, states


def chunk_scan_adjoint(w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor, chunk_decay: Tensor,
                       grad_o: Tensor | None, grad_final: Tensor | None, *,
                       out: tuple[Tensor, Tensor, Tensor] | None = None,
                       config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dU, dS_{n+1} for every n, dS_0)`` as ``mmrec::delta_chunk_scan_backward``, one
    launch. ``grad_o`` or ``grad_final`` may be None (not both); ``grad_o`` is read in any
    layout, the rest as in the forward. ``dU`` and ``dS_{n+1}`` in ``w2``'s dtype, ``dS_0``
    in ``chunk_decay``'s (the accumulation dtype)."""
    batch, heads, chunks, size, key_dim = w2.shape
    value_dim = (grad_o if grad_o is not None else grad_final).shape[-1]
    inputs = [x.contiguous() for x in (w2, q_decayed, k_decayed, attn, chunk_decay)]
    if out is None:
        grad_u = torch.empty((batch, heads, chunks, size, value_dim), dtype=w2.dtype, device=w2.device)
        grad_next = torch.empty((batch, heads, chunks, key_dim, value_dim), dtype=w2.dtype, device=w2.device)
        grad_initial = torch.empty((batch, heads, key_dim, value_dim), dtype=chunk_decay.dtype, device=w2.device)
    else:
        grad_u, grad_next, grad_initial = _checked_outputs(out, (
            (batch, heads, chunks, size, value_dim), (batch, heads, chunks, key_dim, value_dim),
            (batch, heads, key_dim, value_dim)), (w2, w2, chunk_decay))
    if batch * heads * value_dim == 0:
        return grad_u, grad_next, grad_initial
    cfg = launch_config(size, key_dim, value_dim, sequences=batch * heads, sm_count=device_sm_count(w2.device),
                        operands_16_bit=w2.element_size() == 2, interpret=not w2.is_cuda, config=config)
    del cfg["OUTPUT"]  # the forward's
    _check_grid(batch * heads)
    _adjoint_kernel[(triton.cdiv(value_dim, cfg["BLOCK_V"]), batch * heads)](
        *inputs, grad_o, None if grad_final is None else grad_final.contiguous(), grad_u, grad_next, grad_initial,
        heads, chunks, size, key_dim, value_dim, *((0,) * 5 if grad_o is None else grad_o.stride()),
        HAS_DO=grad_o is not None, HAS_DSL=grad_final is not None, **cfg)
    return grad_u, grad_next, grad_initial


def _check_grid(sequences: int) -> None:
    if sequences > 65535:  # CUDA's limit on a grid's second dimension, where the kernels put batch x heads
        raise ValueError(f"delta_chunk_scan's kernels take at most 65535 batch elements x heads, got {sequences}: "
                         "split the batch")


def _checked_outputs(out: tuple[Tensor, ...], shapes: tuple[tuple[int, ...], ...],
                     like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``out`` if each tensor is contiguous, of its shape in ``shapes`` and of the dtype and
    device of its tensor in ``like``: the kernels write exactly that, and nothing checks it
    on the GPU."""
    for x, shape, model in zip(out, shapes, like, strict=True):
        if not x.is_contiguous() or tuple(x.shape) != shape or x.dtype != model.dtype or x.device != model.device:
            raise ValueError(f"out must hold contiguous tensors on {model.device} of shapes {list(shapes)} and dtypes "
                             f"{[m.dtype for m in like]}, got {[(tuple(x.shape), x.dtype, str(x.device), x.is_contiguous()) for x in out]}: "
                             "the kernels write the contiguous layout")
    return out

"""Triton kernels for ``mmrec::delta_chunk_scan`` and ``mmrec::delta_chunk_scan_backward``.

The loop over chunks (``chunk_scan.py``) is sequential in the chunk index but independent
across (batch, head) pairs and across columns of ``V``: every product has ``V`` as its free
column index (``W2 S``, ``Qd S``, ``P U``, ``Kdᵀ U``). So each program
takes one (batch·head, block of ``BLOCK_V`` value columns), keeps its ``[K, BLOCK_V]``
slice of the state on chip in the accumulation dtype for the whole sequence, and walks the
chunks, doing each chunk's four products with ``tl.dot``. Per chunk the forward reads
``W1``, ``W2``, ``Qd``, ``Kd``, ``P`` and ``g`` and writes ``O`` and, when a backward will
follow (``KEEP_STATES``), the chunk's starting state; one launch covers a layer.

The backward kernel runs the adjoint recurrence the other way, ``dU_n = P_nᵀ dO_n +
Kd_n dS``, ``dS ← Qd_nᵀ dO_n + g_n dS − W2_nᵀ dU_n``, with ``dS`` ``[K, BLOCK_V]`` on chip:
per column like the forward (it needs no state). It writes ``dU_n`` and each ``dS_{n+1}``;
the gradients that sum over ``V`` (``dW2``, ``dQd``, ``dKd``, ``dP``, ``dg``) are then
batched products over all chunks at once, in PyTorch (``chunk_scan.py``).

Products take fp32 operands at ``PRECISION`` (``tl.dot``'s ``input_precision``), by
default from ``torch.get_float32_matmul_precision()`` (``default_precision``):
``"tf32x3"``, about fp32 accuracy from three tf32 products on the tensor cores, or
``"tf32"``, one product (relative error about 1e-3 per product), which needs far fewer
registers. Two more for tuning: ``"bf16x3"``, each fp32 operand split into two bf16 parts
and three bf16 products (about 16 bits of mantissa: errors near 1e-4 in tests, with half
tf32x3's registers for the split operands), and ``"ieee"``, exact fp32 on the CUDA cores. The state and every sum stay fp32
(float64 for float64 inputs, which run under the interpreter in tests; on CUDA the op runs
those through cuBLAS). Sizes that are not
powers of two (or below ``tl.dot``'s 16) are padded on chip with masked loads and stores.
The launchers take any strides, and with ``TRITON_INTERPRET=1`` they run on CPU tensors,
which is how the CPU tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


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
    """``a @ b`` with fp32 accumulation; fp32 operands at ``PRECISION`` (module docstring)."""
    if a.dtype != tl.float32:
        return tl.dot(a, b)
    elif PRECISION == "bf16x3" or PRECISION == "bf16x3-interpret":
        a_hi, a_lo = _split_bf16(a, PRECISION == "bf16x3-interpret")
        b_hi, b_lo = _split_bf16(b, PRECISION == "bf16x3-interpret")
        acc = tl.dot(a_lo, b_hi)  # the small terms first; lo x lo left out
        acc = tl.dot(a_hi, b_lo, acc)
        return tl.dot(a_hi, b_hi, acc)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _forward_chunk(n, s, w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, o_ptr, st_ptr,
                   s_w1n, s_w2n, s_qdn, s_kdn, s_pn, s_gn, s_on, s_stn,
                   off_w1, off_w2, off_qd, off_kd, off_p, off_o, off_st, mask_cv, mask_ck, mask_cc, mask_kv,
                   KEEP_STATES: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk: store ``S_n`` (with ``KEEP_STATES``), write ``O_n``, return ``S_{n+1}``."""
    n = tl.full((), 0, tl.int64) + n  # 64-bit offsets
    if KEEP_STATES:
        tl.store(st_ptr + n * s_stn + off_st, s.to(st_ptr.dtype.element_ty), mask=mask_kv)
    w1 = tl.load(w1_ptr + n * s_w1n + off_w1, mask=mask_cv, other=0.0)  # [C, BV]
    w2 = tl.load(w2_ptr + n * s_w2n + off_w2, mask=mask_ck, other=0.0)  # [C, K]
    qd = tl.load(qd_ptr + n * s_qdn + off_qd, mask=mask_ck, other=0.0)  # [C, K]
    kd = tl.load(kd_ptr + n * s_kdn + off_kd, mask=mask_ck, other=0.0)  # [C, K]
    p = tl.load(p_ptr + n * s_pn + off_p, mask=mask_cc, other=0.0)  # [C, C]
    g = tl.load(g_ptr + n * s_gn)
    u = w1 - _dot(w2, s, PRECISION)  # U = W1 − W2 S
    o = _dot(qd, s, PRECISION) + _dot(p, u, PRECISION)  # O = Qd S + P U
    tl.store(o_ptr + n * s_on + off_o, o.to(o_ptr.dtype.element_ty), mask=mask_cv)
    return g * s + _dot(tl.trans(kd), u, PRECISION)  # S ← g S + Kdᵀ U


@triton.jit
def _forward_kernel(
    w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, s0_ptr, o_ptr, sl_ptr, st_ptr,
    H, N, C, K, V,
    s_w1b, s_w1h, s_w1n, s_w1c, s_w1v,
    s_w2b, s_w2h, s_w2n, s_w2c, s_w2k,
    s_qdb, s_qdh, s_qdn, s_qdc, s_qdk,
    s_kdb, s_kdh, s_kdn, s_kdc, s_kdk,
    s_pb, s_ph, s_pn, s_pc, s_ps,
    s_gb, s_gh, s_gn,
    s_s0b, s_s0h, s_s0k, s_s0v,
    s_ob, s_oh, s_on, s_oc, s_ov,
    s_slb, s_slh, s_slk, s_slv,
    s_stb, s_sth, s_stn, s_stk, s_stv,
    KEEP_STATES: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.arange(0, BLOCK_C)  # positions in the chunk
    keys = tl.arange(0, BLOCK_K)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # this program's value columns
    mask_c, mask_k, mask_v = rows < C, keys < K, cols < V
    mask_cv = mask_c[:, None] & mask_v[None, :]
    mask_ck = mask_c[:, None] & mask_k[None, :]
    mask_cc = mask_c[:, None] & mask_c[None, :]
    mask_kv = mask_k[:, None] & mask_v[None, :]

    w1_ptr += b * s_w1b + h * s_w1h
    w2_ptr += b * s_w2b + h * s_w2h
    qd_ptr += b * s_qdb + h * s_qdh
    kd_ptr += b * s_kdb + h * s_kdh
    p_ptr += b * s_pb + h * s_ph
    g_ptr += b * s_gb + h * s_gh
    o_ptr += b * s_ob + h * s_oh
    st_ptr += b * s_stb + h * s_sth
    off_w1 = rows[:, None] * s_w1c + cols[None, :] * s_w1v
    off_w2 = rows[:, None] * s_w2c + keys[None, :] * s_w2k
    off_qd = rows[:, None] * s_qdc + keys[None, :] * s_qdk
    off_kd = rows[:, None] * s_kdc + keys[None, :] * s_kdk
    off_p = rows[:, None] * s_pc + rows[None, :] * s_ps
    off_o = rows[:, None] * s_oc + cols[None, :] * s_ov
    off_st = keys[:, None] * s_stk + cols[None, :] * s_stv

    s = tl.load(s0_ptr + b * s_s0b + h * s_s0h + keys[:, None] * s_s0k + cols[None, :] * s_s0v, mask=mask_kv, other=0.0)
    if STAGES > 0:  # software-pipelined: the next chunks' loads in flight during this one's products
        for n in tl.range(0, N, num_stages=STAGES):
            s = _forward_chunk(n, s, w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, o_ptr, st_ptr,
                               s_w1n, s_w2n, s_qdn, s_kdn, s_pn, s_gn, s_on, s_stn,
                               off_w1, off_w2, off_qd, off_kd, off_p, off_o, off_st, mask_cv, mask_ck, mask_cc, mask_kv,
                               KEEP_STATES, PRECISION)
    else:
        n = 0
        while n < N:  # not range(): Triton's interpreter can't take it a scalar under NumPy >= 2.4
            s = _forward_chunk(n, s, w1_ptr, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, o_ptr, st_ptr,
                               s_w1n, s_w2n, s_qdn, s_kdn, s_pn, s_gn, s_on, s_stn,
                               off_w1, off_w2, off_qd, off_kd, off_p, off_o, off_st, mask_cv, mask_ck, mask_cc, mask_kv,
                               KEEP_STATES, PRECISION)
            n += 1
    tl.store(sl_ptr + b * s_slb + h * s_slh + keys[:, None] * s_slk + cols[None, :] * s_slv,
             s.to(sl_ptr.dtype.element_ty), mask=mask_kv)


@triton.jit
def _adjoint_chunk(n, ds, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, do_ptr, du_ptr, dsn_ptr,
                   s_w2n, s_qdn, s_kdn, s_pn, s_gn, s_don, s_dun, s_dsnn,
                   off_w2, off_qd, off_kd, off_p, off_do, off_du, off_dsn, mask_cv, mask_ck, mask_cc, mask_kv,
                   HAS_DO: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk backwards: store ``dS_{n+1}`` (``ds``) and ``dU_n``, return ``dS_n``."""
    n = tl.full((), 0, tl.int64) + n  # 64-bit offsets
    tl.store(dsn_ptr + n * s_dsnn + off_dsn, ds.to(dsn_ptr.dtype.element_ty), mask=mask_kv)
    w2 = tl.load(w2_ptr + n * s_w2n + off_w2, mask=mask_ck, other=0.0)  # [C, K]
    kd = tl.load(kd_ptr + n * s_kdn + off_kd, mask=mask_ck, other=0.0)  # [C, K]
    g = tl.load(g_ptr + n * s_gn)
    du = _dot(kd, ds, PRECISION)  # dU = Kd dS (+ Pᵀ dO)
    ds = g * ds
    if HAS_DO:
        do = tl.load(do_ptr + n * s_don + off_do, mask=mask_cv, other=0.0)  # dO_n [C, BV]
        qd = tl.load(qd_ptr + n * s_qdn + off_qd, mask=mask_ck, other=0.0)  # [C, K]
        p = tl.load(p_ptr + n * s_pn + off_p, mask=mask_cc, other=0.0)  # [C, C]
        du += _dot(tl.trans(p), do, PRECISION)
        ds += _dot(tl.trans(qd), do, PRECISION)
    tl.store(du_ptr + n * s_dun + off_du, du.to(du_ptr.dtype.element_ty), mask=mask_cv)
    return ds - _dot(tl.trans(w2), du, PRECISION)  # dS_n = Qdᵀ dO + g dS − W2ᵀ dU


@triton.jit
def _adjoint_kernel(
    w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, do_ptr, dsl_ptr, du_ptr, dsn_ptr, ds0_ptr,
    H, N, C, K, V,
    s_w2b, s_w2h, s_w2n, s_w2c, s_w2k,
    s_qdb, s_qdh, s_qdn, s_qdc, s_qdk,
    s_kdb, s_kdh, s_kdn, s_kdc, s_kdk,
    s_pb, s_ph, s_pn, s_pc, s_ps,
    s_gb, s_gh, s_gn,
    s_dob, s_doh, s_don, s_doc, s_dov,
    s_dslb, s_dslh, s_dslk, s_dslv,
    s_dub, s_duh, s_dun, s_duc, s_duv,
    s_dsnb, s_dsnh, s_dsnn, s_dsnk, s_dsnv,
    s_ds0b, s_ds0h, s_ds0k, s_ds0v,
    HAS_DO: tl.constexpr, HAS_DSL: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.arange(0, BLOCK_C)
    keys = tl.arange(0, BLOCK_K)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_c, mask_k, mask_v = rows < C, keys < K, cols < V
    mask_cv = mask_c[:, None] & mask_v[None, :]
    mask_ck = mask_c[:, None] & mask_k[None, :]
    mask_cc = mask_c[:, None] & mask_c[None, :]
    mask_kv = mask_k[:, None] & mask_v[None, :]

    w2_ptr += b * s_w2b + h * s_w2h
    qd_ptr += b * s_qdb + h * s_qdh
    kd_ptr += b * s_kdb + h * s_kdh
    p_ptr += b * s_pb + h * s_ph
    g_ptr += b * s_gb + h * s_gh
    if HAS_DO:
        do_ptr += b * s_dob + h * s_doh
    du_ptr += b * s_dub + h * s_duh
    dsn_ptr += b * s_dsnb + h * s_dsnh
    off_w2 = rows[:, None] * s_w2c + keys[None, :] * s_w2k
    off_qd = rows[:, None] * s_qdc + keys[None, :] * s_qdk
    off_kd = rows[:, None] * s_kdc + keys[None, :] * s_kdk
    off_p = rows[:, None] * s_pc + rows[None, :] * s_ps
    off_do = rows[:, None] * s_doc + cols[None, :] * s_dov
    off_du = rows[:, None] * s_duc + cols[None, :] * s_duv
    off_dsn = keys[:, None] * s_dsnk + cols[None, :] * s_dsnv

    if HAS_DSL:
        ds = tl.load(dsl_ptr + b * s_dslb + h * s_dslh + keys[:, None] * s_dslk + cols[None, :] * s_dslv,
                     mask=mask_kv, other=0.0).to(w2_ptr.dtype.element_ty)
    else:
        ds = tl.zeros((BLOCK_K, BLOCK_V), dtype=w2_ptr.dtype.element_ty)
    if STAGES > 0:
        for i in tl.range(0, N, num_stages=STAGES):
            ds = _adjoint_chunk(N - 1 - i, ds, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, do_ptr, du_ptr, dsn_ptr,
                                s_w2n, s_qdn, s_kdn, s_pn, s_gn, s_don, s_dun, s_dsnn,
                                off_w2, off_qd, off_kd, off_p, off_do, off_du, off_dsn, mask_cv, mask_ck, mask_cc, mask_kv,
                                HAS_DO, PRECISION)
    else:
        n = N - 1
        while n >= 0:  # not range(), as in the forward
            ds = _adjoint_chunk(n, ds, w2_ptr, qd_ptr, kd_ptr, p_ptr, g_ptr, do_ptr, du_ptr, dsn_ptr,
                                s_w2n, s_qdn, s_kdn, s_pn, s_gn, s_don, s_dun, s_dsnn,
                                off_w2, off_qd, off_kd, off_p, off_do, off_du, off_dsn, mask_cv, mask_ck, mask_cc, mask_kv,
                                HAS_DO, PRECISION)
            n -= 1
    tl.store(ds0_ptr + b * s_ds0b + h * s_ds0h + keys[:, None] * s_ds0k + cols[None, :] * s_ds0v,
             ds.to(ds0_ptr.dtype.element_ty), mask=mask_kv)


def default_precision() -> str:
    """``tl.dot``'s ``input_precision`` for fp32 products, from PyTorch's own switch for
    them (``torch.set_float32_matmul_precision``, which also governs cuBLAS in the rest of
    the chunked form): ``"highest"`` (PyTorch's default) gives ``"tf32x3"``, about fp32
    accuracy; ``"high"`` and ``"medium"`` give ``"tf32"``."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def pick_config(size: int, key_dim: int, value_dim: int, *, interpret: bool = False, config: dict | None = None) -> dict:
    """Launch config of either kernel; ``config`` overrides any entry. ``BLOCK_V``: value
    columns per program; ``num_warps``; ``STAGES``: software-pipelining depth of the chunk
    loop (0: none); ``PRECISION``: ``tl.dot``'s ``input_precision`` for fp32 (exact fp32
    under the interpreter, which ignores it)."""
    block_k = max(16, triton.next_power_of_2(key_dim))
    # A program holds the chunk's [C, K] operands and a [K, BLOCK_V] fp32 state (or its
    # adjoint). 32 columns, and 8 warps past K = 64: with C = 64 on sm_90, neither kernel
    # spills with tf32 products (tf32x3, which splits every operand in registers, spills
    # a little at K = 64 and 1-2 KB a thread at K = 128).
    cfg = {
        "BLOCK_C": max(16, triton.next_power_of_2(size)),
        "BLOCK_K": block_k,
        "BLOCK_V": max(16, min(32, triton.next_power_of_2(value_dim))),
        "num_warps": 4 if block_k <= 64 else 8,
        "STAGES": 0,
        "PRECISION": "ieee" if interpret else default_precision(),
    }
    cfg.update(config or {})
    if interpret and cfg["PRECISION"] == "bf16x3":
        cfg["PRECISION"] = "bf16x3-interpret"
    for name in ("BLOCK_C", "BLOCK_K", "BLOCK_V"):
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile), got {cfg[name]}")
    if cfg["BLOCK_C"] < size or cfg["BLOCK_K"] < key_dim:
        raise ValueError(f"BLOCK_C and BLOCK_K must cover the chunk ({size}) and the key size ({key_dim})")
    return cfg


def chunk_scan_forward(w1: Tensor, w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor, chunk_decay: Tensor,
                       initial_state: Tensor, *, keep_states: bool = True, out: tuple[Tensor, Tensor, Tensor] | None = None,
                       config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(O, final state, states)`` as ``mmrec::delta_chunk_scan``, one launch; without
    ``keep_states`` no chunk's state is written (``states`` has 0 chunks).

    ``out`` takes preallocated outputs; ``config`` overrides the launch config (``pick_config``)."""
    batch, heads, chunks, size, value_dim = w1.shape
    key_dim = w2.shape[-1]
    if out is None:
        o = torch.empty(w1.shape, dtype=w1.dtype, device=w1.device)
        final = torch.empty(initial_state.shape, dtype=w1.dtype, device=w1.device)
        states = torch.empty((batch, heads, chunks if keep_states else 0, key_dim, value_dim), dtype=w1.dtype,
                             device=w1.device)
    else:
        o, final, states = out
    if batch * heads * value_dim == 0:
        final.copy_(initial_state)
        return o, final, states
    cfg = pick_config(size, key_dim, value_dim, interpret=not w1.is_cuda, config=config)
    grid = (triton.cdiv(value_dim, cfg["BLOCK_V"]), batch * heads)
    _forward_kernel[grid](
        w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state, o, final, states,
        heads, chunks, size, key_dim, value_dim,
        *w1.stride(), *w2.stride(), *q_decayed.stride(), *k_decayed.stride(), *attn.stride(), *chunk_decay.stride(),
        *initial_state.stride(), *o.stride(), *final.stride(), *states.stride(),
        KEEP_STATES=keep_states, **cfg,
    )
    return o, final, states


def chunk_scan_adjoint(w2: Tensor, q_decayed: Tensor, k_decayed: Tensor, attn: Tensor, chunk_decay: Tensor,
                       grad_o: Tensor | None, grad_final: Tensor | None, *,
                       out: tuple[Tensor, Tensor, Tensor] | None = None,
                       config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dU, dS_{n+1} for every n, dS_0)`` as ``mmrec::delta_chunk_scan_backward``, one
    launch. ``grad_o`` or ``grad_final`` may be None (not both); ``out`` and ``config`` as
    in the forward."""
    batch, heads, chunks, size, key_dim = w2.shape
    value_dim = (grad_o if grad_o is not None else grad_final).shape[-1]
    if out is None:
        grad_u = torch.empty((batch, heads, chunks, size, value_dim), dtype=w2.dtype, device=w2.device)
        grad_next = torch.empty((batch, heads, chunks, key_dim, value_dim), dtype=w2.dtype, device=w2.device)
        grad_initial = torch.empty((batch, heads, key_dim, value_dim), dtype=w2.dtype, device=w2.device)
    else:
        grad_u, grad_next, grad_initial = out
    if batch * heads * value_dim == 0:
        return grad_u, grad_next, grad_initial
    cfg = pick_config(size, key_dim, value_dim, interpret=not w2.is_cuda, config=config)
    grid = (triton.cdiv(value_dim, cfg["BLOCK_V"]), batch * heads)
    _adjoint_kernel[grid](
        w2, q_decayed, k_decayed, attn, chunk_decay, grad_o, grad_final, grad_u, grad_next, grad_initial,
        heads, chunks, size, key_dim, value_dim,
        *w2.stride(), *q_decayed.stride(), *k_decayed.stride(), *attn.stride(), *chunk_decay.stride(),
        *((0,) * 5 if grad_o is None else grad_o.stride()), *((0,) * 4 if grad_final is None else grad_final.stride()),
        *grad_u.stride(), *grad_next.stride(), *grad_initial.stride(),
        HAS_DO=grad_o is not None, HAS_DSL=grad_final is not None, **cfg,
    )
    return grad_u, grad_next, grad_initial

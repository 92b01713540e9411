"""The ``linear_scan`` Triton kernels with the options only tile sweeps use.

A copy of ``_scan_fwd_kernel`` and ``_scan_bwd_kernel`` (and their per-tile helpers) from
``mmrec/ops/linear_scan_triton.py`` with two more variants that no shipped tile selects,
kept so that ``tools/scan_sweep.py`` can time them against the shipped tiles:

* ``STREAM``: cache hints for streamed data (``evict_first`` on the re-read rows, ``.cs``
  on the stores, which this kernel never reads again);
* ``STAGES > 0`` with ``REREAD=True``: the software-pipelined loop re-reading each row's
  previous group (the production kernels pipeline only the ``REREAD=False`` form).

Everything else (loads, the scans across groups, masking) is imported from the library
module, and the launchers mirror its ``scan_forward`` / ``scan_backward``, taking any
``config`` key the kernels take. With every option at the library's values the kernels
compute the same as the library's. tests/tools/test_scan_kernel_options.py checks them
against the float64 reference under Triton's interpreter (and compiled, on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmrec.ops.linear_scan_triton import (
    _entering,
    _entering_exclusive,
    _gate,
    _last_group,
    _load_bwd_tile,
    _load_tile,
    _pick_config,
    _strides2,
)

OPTIONS = ("STREAM", "STAGES", "REREAD")  # the kernels' options beyond the tile shape


@triton.jit
def _forward_tile(av, bv, carry, a_base, b_base, h_base, off_a, off_b, off_h, s_at, s_bt, s_ht, sign, groups, mask_d, n,
                  G: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, LOG_A: tl.constexpr, A_ONE: tl.constexpr,
                  REREAD_EVICT: tl.constexpr, STORE_CACHE: tl.constexpr, REREAD: tl.constexpr):
    """Scan one tile (``av``, ``bv`` from :func:`_load_tile`, bases at the tile's start)
    from the state ``carry``, store its states, return the state after it."""
    pa = tl.full((G, BLOCK_D), 1.0, carry.dtype)
    pb = tl.zeros((G, BLOCK_D), dtype=carry.dtype)
    if REREAD:
        # Each row's previous group, read again (a cache hit: these rows arrived with the
        # tile), composed in registers; row 0's is the identity.
        for k in tl.static_range(R):
            p = (groups - 1) * R + k  # position in this tile
            m = ((groups >= 1) & (p < n))[:, None] & mask_d[None, :]
            ak = _gate(tl.load(a_base + sign * (k - R) * s_at + off_a, mask=m, other=A_ONE, eviction_policy=REREAD_EVICT),
                       carry.dtype, LOG_A)
            bk = tl.load(b_base + sign * (k - R) * s_bt + off_b, mask=m, other=0.0, eviction_policy=REREAD_EVICT).to(carry.dtype)
            pa = pa * ak
            pb = pb * ak + bk
        h = _entering(pa, pb, carry)
    else:  # each row's own group total, from registers
        for k in tl.static_range(R):
            ak = _gate(av[k], carry.dtype, LOG_A)
            pa = pa * ak
            pb = pb * ak + bv[k].to(carry.dtype)
        h = _entering_exclusive(pa, pb, carry)
    for k in tl.static_range(R):
        h = _gate(av[k], carry.dtype, LOG_A) * h + bv[k].to(carry.dtype)
        m = (groups * R + k < n)[:, None] & mask_d[None, :]
        tl.store(h_base + sign * k * s_ht + off_h, h.to(h_base.dtype.element_ty), mask=m, cache_modifier=STORE_CACHE)
    return _last_group(h, G)


@triton.jit
def _scan_fwd_kernel(
    a_ptr, b_ptr, h0_ptr, h_ptr, hlast_ptr,
    T, D, n_tiles,
    s_ab, s_at, s_ad,
    s_bb, s_bt, s_bd,
    s_h0b, s_h0d,
    s_hb, s_ht, s_hd,
    s_lb, s_ld,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr, ACC_FP64: tl.constexpr, LOG_A: tl.constexpr,
    G: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, STREAM: tl.constexpr = False, STAGES: tl.constexpr = 0,
    REREAD: tl.constexpr = True,
):
    # A tile is G groups of R consecutive steps; this program walks the tiles in order.
    # Position p = i * G * R + j * R + k (tile i, group j, step k) is time t = p (or
    # T - 1 - p when REVERSE); sub-tile k holds step k of every group, so each thread
    # owns whole groups and runs the R steps of a group sequentially in registers.
    BLOCK_T: tl.constexpr = G * R
    A_ONE: tl.constexpr = 0.0 if LOG_A else 1.0  # what masked steps load: the identity
    # Options tried in the tile sweep. STREAM: the re-read rows are their last use, the
    # stores are not read again by this kernel. STAGES > 0: Triton's software pipeline
    # (asynchronous copies through shared memory, STAGES - 1 tiles ahead) replaces the
    # prefetch into registers. REREAD=False: each row's exclusive prefix comes from a scan
    # of its own group totals (``_entering_exclusive``) instead of re-reading the rows
    # of the group before it.
    REREAD_EVICT: tl.constexpr = "evict_first" if STREAM else ""
    STORE_CACHE: tl.constexpr = ".cs" if STREAM else ""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = (pid_d * BLOCK_D).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_d = pid_d * BLOCK_D + cols < D
    groups = tl.arange(0, G)
    if REVERSE:
        sign = -1
        t0 = tl.full((), 0, tl.int64) + (T - 1)
    else:
        sign = 1
        t0 = tl.full((), 0, tl.int64)
    # Pointers: a scalar base that moves one tile per iteration, plus 32-bit offsets.
    a_base = a_ptr + pid_b * s_ab + t0 * s_at + d0 * s_ad
    b_base = b_ptr + pid_b * s_bb + t0 * s_bt + d0 * s_bd
    h_base = h_ptr + pid_b * s_hb + t0 * s_ht + d0 * s_hd
    dt = sign * groups * R
    off_a = dt[:, None] * s_at + cols[None, :] * s_ad
    off_b = dt[:, None] * s_bt + cols[None, :] * s_bd
    off_h = dt[:, None] * s_ht + cols[None, :] * s_hd

    if ACC_FP64:
        carry = tl.zeros((BLOCK_D,), dtype=tl.float64)
    else:
        carry = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(h0_ptr + pid_b * s_h0b + (d0 + cols) * s_h0d, mask=mask_d, other=0.0)
        carry += h0.to(carry.dtype)

    if STAGES > 0:
        for i in tl.range(0, n_tiles, num_stages=STAGES):
            n = T - i * BLOCK_T  # positions left, this tile's included
            a_tile = a_base + sign * i * BLOCK_T * s_at
            b_tile = b_base + sign * i * BLOCK_T * s_bt
            av, bv = _load_tile(a_tile, b_tile, off_a, off_b, s_at, s_bt, sign, groups, mask_d, n, R, A_ONE)
            carry = _forward_tile(av, bv, carry, a_tile, b_tile, h_base + sign * i * BLOCK_T * s_ht,
                                  off_a, off_b, off_h, s_at, s_bt, s_ht, sign, groups, mask_d, n,
                                  G, R, BLOCK_D, LOG_A, A_ONE, REREAD_EVICT, STORE_CACHE, REREAD)
    else:
        # Loads for the first tile; each iteration then issues the next tile's loads
        # before it computes (fully masked past the end), so they overlap the arithmetic.
        a_next, b_next = _load_tile(a_base, b_base, off_a, off_b, s_at, s_bt, sign, groups, mask_d, T, R, A_ONE)
        i = 0
        while i < n_tiles:  # not range(): Triton's interpreter can't take it a scalar under NumPy >= 2.4
            av = a_next
            bv = b_next
            n = T - i * BLOCK_T  # positions left, this tile's included
            a_next, b_next = _load_tile(a_base + sign * BLOCK_T * s_at, b_base + sign * BLOCK_T * s_bt,
                                        off_a, off_b, s_at, s_bt, sign, groups, mask_d, n - BLOCK_T, R, A_ONE)
            carry = _forward_tile(av, bv, carry, a_base, b_base, h_base, off_a, off_b, off_h, s_at, s_bt, s_ht,
                                  sign, groups, mask_d, n, G, R, BLOCK_D, LOG_A, A_ONE, REREAD_EVICT, STORE_CACHE, REREAD)
            a_base += sign * BLOCK_T * s_at
            b_base += sign * BLOCK_T * s_bt
            h_base += sign * BLOCK_T * s_ht
            i += 1

    tl.store(hlast_ptr + pid_b * s_lb + (d0 + cols) * s_ld, carry.to(hlast_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _backward_tile(av, hv, gv, carry, h_before, a_base, g_base, da_base, db_base, off_a, off_g, off_da, off_db,
                   s_at, s_gt, s_dat, s_dbt, sign, groups, mask_d, n, tile,
                   G: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, LOG_A: tl.constexpr, A_ONE: tl.constexpr,
                   HAS_DH: tl.constexpr, HAS_H0: tl.constexpr, REREAD_EVICT: tl.constexpr, STORE_CACHE: tl.constexpr,
                   REREAD: tl.constexpr):
    """The adjoint recurrence over one tile (from :func:`_load_bwd_tile`, bases at the
    tile's start) from ``carry``; stores its ``grad_a``, ``grad_b``; returns the carry.
    ``h_before`` stands for the state before the sequence's first step (``HAS_H0``)."""
    pa = tl.full((G, BLOCK_D), 1.0, carry.dtype)
    pb = tl.zeros((G, BLOCK_D), dtype=carry.dtype)
    if REREAD:
        # Each row's previous group, read again (cache hits), composed in registers.
        # Only tile 0's first position has no coefficient (a past the end): masked to 1.
        for k in tl.static_range(R):
            p = (groups - 1) * R + k  # position in this tile
            m = ((groups >= 1) & (p < n))[:, None] & mask_d[None, :]
            ak = tl.load(a_base + sign * (k - R) * s_at + off_a,
                         mask=m & ((p >= 1) | (tile > 0))[:, None], other=A_ONE, eviction_policy=REREAD_EVICT)
            ak = _gate(ak, carry.dtype, LOG_A)
            pa = pa * ak
            pb = pb * ak
            if HAS_DH:
                gk = tl.load(g_base + sign * (k - R) * s_gt + off_g, mask=m, other=0.0, eviction_policy=REREAD_EVICT)
                pb += gk.to(carry.dtype)
        g = _entering(pa, pb, carry)
    else:  # each row's own group total, from registers
        for k in tl.static_range(R):
            ak = _gate(av[k], carry.dtype, LOG_A)
            pa = pa * ak
            pb = pb * ak
            if HAS_DH:
                pb += gv[k].to(carry.dtype)
        g = _entering_exclusive(pa, pb, carry)
    for k in tl.static_range(R):
        g = _gate(av[k], carry.dtype, LOG_A) * g
        if HAS_DH:
            g += gv[k].to(carry.dtype)
        hp = hv[k].to(carry.dtype)
        if HAS_H0:
            hp = tl.where((groups * R + k == n - 1)[:, None], h_before[None, :], hp)
        m = (groups * R + k < n)[:, None] & mask_d[None, :]
        da = g * hp
        if LOG_A:
            # d/d(log a_t) = a_t d/da_t. a_t is the next position's coefficient: sub-tile
            # k + 1 (the extra one for a group's last step). It is masked to 1 at the
            # sequence's first step, whose a_t the caller has folded into h0.
            da = da * _gate(av[k + 1], carry.dtype, LOG_A)
        tl.store(db_base + sign * k * s_dbt + off_db, g.to(db_base.dtype.element_ty), mask=m, cache_modifier=STORE_CACHE)
        tl.store(da_base + sign * k * s_dat + off_da, da.to(da_base.dtype.element_ty), mask=m, cache_modifier=STORE_CACHE)
    return _last_group(g, G)


@triton.jit
def _scan_bwd_kernel(
    a_ptr, h_ptr, dh_ptr, dhl_ptr, h0_ptr,
    da_ptr, db_ptr, dh0_ptr,
    T, D, n_tiles,
    s_ab, s_at, s_ad,
    s_hb, s_ht, s_hd,
    s_gb, s_gt, s_gd,
    s_glb, s_gld,
    s_h0b, s_h0d,
    s_dab, s_dat, s_dad,
    s_dbb, s_dbt, s_dbd,
    s_dh0b, s_dh0d,
    HAS_DH: tl.constexpr, HAS_DHL: tl.constexpr, HAS_H0: tl.constexpr,
    REVERSE: tl.constexpr, ACC_FP64: tl.constexpr, LOG_A: tl.constexpr,
    G: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, STREAM: tl.constexpr = False, STAGES: tl.constexpr = 0,
    REREAD: tl.constexpr = True,
):
    # REVERSE is the direction of the forward scan; this pass runs the other way, over
    # positions p (tiled as in the forward kernel) at times t = T-1-p, or t = p.
    # The coefficient at p is a at p - 1 (the forward's next step) and da needs h at
    # p + 1 (the forward's previous step; h0 past the end).
    BLOCK_T: tl.constexpr = G * R
    A_ONE: tl.constexpr = 0.0 if LOG_A else 1.0  # what masked steps load: the identity
    # STREAM, STAGES: as in the forward kernel.
    REREAD_EVICT: tl.constexpr = "evict_first" if STREAM else ""
    STORE_CACHE: tl.constexpr = ".cs" if STREAM else ""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d0 = (pid_d * BLOCK_D).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask_d = pid_d * BLOCK_D + cols < D
    groups = tl.arange(0, G)
    if REVERSE:
        sign = 1
        t0 = tl.full((), 0, tl.int64)
    else:
        sign = -1
        t0 = tl.full((), 0, tl.int64) + (T - 1)
    a_base = a_ptr + pid_b * s_ab + t0 * s_at + d0 * s_ad
    h_base = h_ptr + pid_b * s_hb + t0 * s_ht + d0 * s_hd
    g_base = dh_ptr + pid_b * s_gb + t0 * s_gt + d0 * s_gd
    da_base = da_ptr + pid_b * s_dab + t0 * s_dat + d0 * s_dad
    db_base = db_ptr + pid_b * s_dbb + t0 * s_dbt + d0 * s_dbd
    dt = sign * groups * R
    off_a = (dt - sign)[:, None] * s_at + cols[None, :] * s_ad
    off_at = dt[:, None] * s_at + cols[None, :] * s_ad  # a_t itself, for the gradient of log a (LOG_A)
    off_h = (dt + sign)[:, None] * s_ht + cols[None, :] * s_hd
    off_g = dt[:, None] * s_gt + cols[None, :] * s_gd
    off_da = dt[:, None] * s_dat + cols[None, :] * s_dad
    off_db = dt[:, None] * s_dbt + cols[None, :] * s_dbd

    if ACC_FP64:
        carry = tl.zeros((BLOCK_D,), dtype=tl.float64)
    else:
        carry = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DHL:
        gl = tl.load(dhl_ptr + pid_b * s_glb + (d0 + cols) * s_gld, mask=mask_d, other=0.0)
        carry += gl.to(carry.dtype)
    if HAS_H0:
        h0 = tl.load(h0_ptr + pid_b * s_h0b + (d0 + cols) * s_h0d, mask=mask_d, other=0.0).to(carry.dtype)
        # grad_h0 = a_first * g_first, after the last tile; a_first also completes the
        # gradient of log a at the first step (see _backward_tile), through h0.
        if REVERSE:
            t_first = tl.full((), 0, tl.int64) + (T - 1)
        else:
            t_first = tl.full((), 0, tl.int64)
        a_first = _gate(tl.load(a_ptr + pid_b * s_ab + t_first * s_at + (d0 + cols) * s_ad, mask=mask_d, other=0.0),
                        carry.dtype, LOG_A)
        h_before = h0 * a_first if LOG_A else h0
    else:
        h_before = carry  # never read (HAS_H0 is off); the tile helper takes an argument
    if STAGES > 0:
        for i in tl.range(0, n_tiles, num_stages=STAGES):
            n = T - i * BLOCK_T
            step = sign * i * BLOCK_T
            av, hv, gv = _load_bwd_tile(a_base + step * s_at, h_base + step * s_ht, g_base + step * s_gt, off_a, off_at, off_h,
                                        off_g, s_at, s_ht, s_gt, sign, groups, mask_d, n, i, R, A_ONE, HAS_DH, LOG_A)
            carry = _backward_tile(av, hv, gv, carry, h_before, a_base + step * s_at, g_base + step * s_gt,
                                   da_base + step * s_dat, db_base + step * s_dbt, off_a, off_g, off_da, off_db,
                                   s_at, s_gt, s_dat, s_dbt, sign, groups, mask_d, n, i,
                                   G, R, BLOCK_D, LOG_A, A_ONE, HAS_DH, HAS_H0, REREAD_EVICT, STORE_CACHE, REREAD)
    else:
        a_next, h_next, g_next = _load_bwd_tile(a_base, h_base, g_base, off_a, off_at, off_h, off_g, s_at, s_ht, s_gt,
                                                sign, groups, mask_d, T, 0, R, A_ONE, HAS_DH, LOG_A)
        i = 0
        while i < n_tiles:  # not range(): Triton's interpreter can't take it a scalar under NumPy >= 2.4
            av = a_next
            hv = h_next
            gv = g_next
            n = T - i * BLOCK_T
            a_next, h_next, g_next = _load_bwd_tile(
                a_base + sign * BLOCK_T * s_at, h_base + sign * BLOCK_T * s_ht, g_base + sign * BLOCK_T * s_gt,
                off_a, off_at, off_h, off_g, s_at, s_ht, s_gt, sign, groups, mask_d, n - BLOCK_T, i + 1, R, A_ONE, HAS_DH, LOG_A)
            carry = _backward_tile(av, hv, gv, carry, h_before, a_base, g_base, da_base, db_base, off_a, off_g, off_da, off_db,
                                   s_at, s_gt, s_dat, s_dbt, sign, groups, mask_d, n, i,
                                   G, R, BLOCK_D, LOG_A, A_ONE, HAS_DH, HAS_H0, REREAD_EVICT, STORE_CACHE, REREAD)
            a_base += sign * BLOCK_T * s_at
            h_base += sign * BLOCK_T * s_ht
            g_base += sign * BLOCK_T * s_gt
            da_base += sign * BLOCK_T * s_dat
            db_base += sign * BLOCK_T * s_dbt
            i += 1

    if HAS_H0:
        dh0 = a_first * carry  # carry: g at the first step
        tl.store(dh0_ptr + pid_b * s_dh0b + (d0 + cols) * s_dh0d, dh0.to(dh0_ptr.dtype.element_ty), mask=mask_d)


def _tile(kind, log_space, device, dtype, batch, length, dim, config):
    """The library's default tile for this call, overridden by ``config`` (not checked
    against the library's keys: this is where the other options go)."""
    return {**_pick_config(kind, log_space, device, dtype, batch, length, dim, None), **(config or {})}


def scan_forward(
    a: Tensor,
    b: Tensor,
    h0: Tensor | None = None,
    reverse: bool = False,
    *,
    log_space: bool = False,
    accumulate_fp64: bool = False,
    out_dtype: torch.dtype | None = None,
    out: tuple[Tensor, Tensor] | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """As ``mmrec.ops.linear_scan_triton.scan_forward``, through the kernels here."""
    if a.shape != b.shape:
        shape = torch.broadcast_shapes(a.shape, b.shape)
        a, b = a.expand(shape), b.expand(shape)
    batch, length, dim = b.shape
    dtype = a.dtype if a.dtype == b.dtype else torch.promote_types(a.dtype, b.dtype)
    fp64 = bool(accumulate_fp64 or dtype == torch.float64)
    if out is None:
        last_dtype = dtype if out_dtype is None else (torch.float64 if fp64 else torch.float32)
        h = torch.empty((batch, length, dim), dtype=out_dtype or dtype, device=b.device)
        h_last = torch.empty((batch, dim), dtype=last_dtype, device=b.device)
    else:
        h, h_last = out
    if h.numel() == 0:
        return h, h_last
    cfg = _tile("fwd", log_space, b.device, dtype, batch, length, dim, config)
    tile = cfg["G"] * cfg["R"]
    _scan_fwd_kernel[(triton.cdiv(dim, cfg["BLOCK_D"]), batch)](
        a, b, h0, h, h_last,
        length, dim, (length + tile - 1) // tile,
        *a.stride(), *b.stride(), *_strides2(h0), *h.stride(), *h_last.stride(),
        HAS_H0=h0 is not None, REVERSE=bool(reverse), ACC_FP64=fp64, LOG_A=bool(log_space),
        **cfg,
    )
    return h, h_last


def scan_backward(
    a: Tensor,
    h: Tensor,
    grad_h: Tensor | None,
    grad_h_last: Tensor | None = None,
    h0: Tensor | None = None,
    reverse: bool = False,
    b_dtype: torch.dtype | None = None,
    *,
    log_space: bool = False,
    accumulate_fp64: bool = False,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
    config: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """As ``mmrec.ops.linear_scan_triton.scan_backward``, through the kernels here."""
    batch, length, dim = h.shape
    if a.shape != h.shape:
        a = a.expand(h.shape)
    b_dtype = b_dtype or h.dtype
    # the forward's accumulation dtype: from its inputs, not from h (stored narrower with out_dtype)
    fp64 = bool(accumulate_fp64 or torch.promote_types(a.dtype, b_dtype) == torch.float64)
    if out is None:
        grad_a = torch.empty(h.shape, dtype=a.dtype, device=h.device)
        grad_b = torch.empty(h.shape, dtype=b_dtype, device=h.device)
        grad_h0 = h.new_empty(0) if h0 is None else torch.empty((batch, dim), dtype=h0.dtype, device=h.device)
    else:
        grad_a, grad_b, grad_h0 = out
    if h.numel() == 0:
        if h0 is not None:
            grad_h0.zero_()
        return grad_a, grad_b, grad_h0
    cfg = _tile("bwd", log_space, h.device, h.dtype, batch, length, dim, config)
    tile = cfg["G"] * cfg["R"]
    _scan_bwd_kernel[(triton.cdiv(dim, cfg["BLOCK_D"]), batch)](
        a, h, h if grad_h is None else grad_h, grad_h_last, h0,  # h: never read
        grad_a, grad_b, grad_h0 if h0 is not None else None,
        length, dim, (length + tile - 1) // tile,
        *a.stride(), *h.stride(), *(h.stride() if grad_h is None else grad_h.stride()),
        *_strides2(grad_h_last), *_strides2(h0),
        *grad_a.stride(), *grad_b.stride(), *(grad_h0.stride() if h0 is not None else (0, 0)),
        HAS_DH=grad_h is not None, HAS_DHL=grad_h_last is not None, HAS_H0=h0 is not None,
        REVERSE=bool(reverse), ACC_FP64=fp64, LOG_A=bool(log_space),
        **cfg,
    )
    return grad_a, grad_b, grad_h0

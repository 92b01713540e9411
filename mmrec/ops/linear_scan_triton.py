"""Triton kernels for ``mmrec::linear_scan`` and ``mmrec::linear_scan_backward``.

Both kernels give one program to each (batch, block of ``BLOCK_D`` channels) pair and walk
the time axis in tiles of ``G * R`` steps: ``G`` groups of ``R`` consecutive steps. Each
thread holds whole groups (``R`` sub-tiles kept in a tuple), so a group's steps run
sequentially in registers; only the group totals cross threads, in one
``tl.associative_scan`` over the ``G`` rows (operator ``(a1, b1) . (a2, b2) =
(a1 a2, a2 b1 + b2)``). Row j needs the composition of groups 0..j-1: either each row
reads its previous group again (``REREAD``; cache hits, the same lines were loaded a
moment before) or the scan carries every prefix without its last group as well, so each
row's own total suffices. The state carried in from the previous tile enters the scan
result, and the last group's final state is carried to the next tile. The next tile's
loads are issued before the current tile's arithmetic (or, with ``STAGES``, Triton's
software pipeline copies them ahead through shared memory). Device memory sees each
element read once and written once:

* forward: read ``a``, ``b``; write ``h`` (6 bytes per element in bf16);
* backward: read ``a``, ``h``, ``grad_h``; write ``grad_a``, ``grad_b`` (10 bytes).

The backward pass is the adjoint recurrence ``g_t = a_{t+1} g_{t+1} + grad_h_t`` run the
other way, started from ``grad_h_last``; it reads ``a`` one step ahead and ``h`` one step
behind (neighbouring rows, served by the caches), and forms ``grad_a_t = g_t h_{t-1}``,
``grad_b_t = g_t`` and ``grad_h0 = a_first g_first`` in the same pass.

With ``LOG_A`` the kernels read ``log a`` where they read ``a`` and take ``exp`` in the
accumulation dtype in registers (masked steps load 0, the log of the identity 1); the
backward forms the gradient of ``log a``, ``g_t h_{t-1} a_t``, taking ``a_t`` from the
coefficient rows it holds (one step ahead), and reads only each group's last ``a_t``
again (a neighbouring row, so a cache hit).

Inputs may be non-contiguous or broadcast (stride 0): strides go to the kernels and
nothing is copied. Accumulation is float32 (float64 for float64 inputs, or on request);
the stores cast to the outputs' dtypes, so ``h`` may be narrower than the state
(``out_dtype``) while ``h_last`` keeps the accumulation dtype.
The launchers take any tensors Triton can address, so with ``TRITON_INTERPRET=1`` they
run on CPU tensors too, which is how the CPU test suite checks them. How the kernels and
their tiles were chosen: docs/notes/scan-kernel.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tile shape per pass and dtype size in bytes: (G groups, R steps per group, BLOCK_D,
# num_warps[, {kernel option: value}]). The 2-byte tiles are the best of tile sweeps at
# B=4, T=32768, D=4096 on an H100 (docs/notes/scan-kernel.md: how they were chosen;
# docs/benchmarks.md: what they reach); cards without an entry in ``_CARD_CONFIGS`` get
# them. The other sizes were chosen to compile without register spills and are not timed.
#
# The 2-byte tiles are 128 channels wide, so each program reads and writes rows of 256
# contiguous bytes: on the H100 even a scan-free copy in this tiling stays well below copy
# bandwidth with 128-byte rows and comes close to it with 256 (docs/notes/scan-kernel.md).
_CONFIGS = {
    "fwd": {2: (8, 8, 128, 4, {"STAGES": 3, "REREAD": False}), 4: (16, 4, 32, 4), 8: (16, 2, 32, 4)},
    "bwd": {2: (16, 4, 128, 8, {"REREAD": False}), 4: (64, 2, 32, 8), 8: (16, 2, 32, 4)},
}
# With log a (2-byte inputs); the forward wants 8 warps for the exps.
_LOG_CONFIGS = {
    "fwd": {2: (16, 8, 128, 8, {"STAGES": 3, "REREAD": False})},
    "bwd": {2: (16, 4, 128, 8, {"REREAD": False})},
}
# Cards whose own sweep chose other 2-byte tiles, by device-name prefix: ((pass, log a):
# tile). The H200 moves 1.4x the H100's bytes per second and is faster with two programs
# of 64 channels per multiprocessor than with the H100's 128-channel tiles.
_CARD_CONFIGS = {
    "NVIDIA H200": {
        ("fwd", False): (16, 8, 64, 4),
        ("bwd", False): (32, 4, 64, 8, {"REREAD": False}),
        ("fwd", True): (16, 8, 64, 4, {"STAGES": 3, "REREAD": False}),
        ("bwd", True): (16, 4, 64, 4, {"STAGES": 3, "REREAD": False}),
    },
}
# What ``config`` may set: the tile shape and the kernels' two options (see
# ``_scan_fwd_kernel``).
_CONFIG_KEYS = ("G", "R", "BLOCK_D", "num_warps", "STAGES", "REREAD")
# Triton's software pipeline (STAGES) keeps tiles in shared memory: up to 147 KB for the
# tiles above, which Hopper gives a block (227 KB) and smaller cards may not. There the
# same shape prefetches into registers instead.
_PIPELINE_SHARED_MEMORY = 227 * 1024


@triton.jit
def _gate(x, dtype: tl.constexpr, LOG_A: tl.constexpr):
    """The decay in the accumulation dtype, from ``a`` or (``LOG_A``) from ``log a``."""
    y = x.to(dtype)
    if LOG_A:
        y = tl.exp(y)
    return y


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) applied first, then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _entering(pa, pb, carry):
    """State entering each group of a tile from the totals of the group before it.

    ``(pa, pb)`` is row j's previous group's composition (the identity for row 0), so
    an inclusive scan over the rows gives the composition of groups 0..j-1, which is
    applied to the state ``carry`` entering the tile.
    """
    sa, sb = tl.associative_scan((pa, pb), 0, _combine)
    return sb + sa * carry[None, :]


@triton.jit
def _combine_exclusive(ia1, ib1, ea1, eb1, ia2, ib2, ea2, eb2):
    # segments 1 then 2, each as (composition of all its groups, of all but its last);
    # the combined segment's last group is segment 2's
    a, b = _combine(ia1, ib1, ia2, ib2)
    ea, eb = _combine(ia1, ib1, ea2, eb2)
    return a, b, ea, eb


@triton.jit
def _entering_exclusive(ta, tb, carry):
    """As :func:`_entering`, from each row's *own* group total ``(ta, tb)``: the scan
    carries every prefix's composition without its last group as well, which for row j is
    groups 0..j-1, so no row needs its neighbour's data."""
    one = tl.full(ta.shape, 1.0, ta.dtype)
    zero = tl.zeros(ta.shape, ta.dtype)
    _, _, ea, eb = tl.associative_scan((ta, tb, one, zero), 0, _combine_exclusive)
    return eb + ea * carry[None, :]


@triton.jit
def _last_group(x, G: tl.constexpr):
    groups = tl.arange(0, G)
    return tl.sum(tl.where(groups[:, None] == G - 1, x, 0.0), axis=0)


@triton.jit
def _load_tile(a_base, b_base, off_a, off_b, s_at, s_bt, sign, groups, mask_d, n,
               R: tl.constexpr, A_ONE: tl.constexpr):
    """One tile of ``a`` and ``b`` as R sub-tiles ``[G, BLOCK_D]`` (sub-tile k: step k of
    every group); ``n`` positions are left from the tile's start (masked past the end)."""
    a_tile = ()
    b_tile = ()
    for k in tl.static_range(R):
        m = (groups * R + k < n)[:, None] & mask_d[None, :]
        a_tile = a_tile + (tl.load(a_base + sign * k * s_at + off_a, mask=m, other=A_ONE),)
        b_tile = b_tile + (tl.load(b_base + sign * k * s_bt + off_b, mask=m, other=0.0),)
    return a_tile, b_tile


@triton.jit
def _forward_tile(av, bv, carry, a_base, b_base, h_base, off_a, off_b, off_h, s_at, s_bt, s_ht, sign, groups, mask_d, n,
                  G: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, LOG_A: tl.constexpr, A_ONE: tl.constexpr,
                  REREAD: tl.constexpr):
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
            ak = _gate(tl.load(a_base + sign * (k - R) * s_at + off_a, mask=m, other=A_ONE), carry.dtype, LOG_A)
            bk = tl.load(b_base + sign * (k - R) * s_bt + off_b, mask=m, other=0.0).to(carry.dtype)
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
        tl.store(h_base + sign * k * s_ht + off_h, h.to(h_base.dtype.element_ty), mask=m)
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
    G: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr = 0, REREAD: tl.constexpr = True,
):
    # A tile is G groups of R consecutive steps; this program walks the tiles in order.
    # Position p = i * G * R + j * R + k (tile i, group j, step k) is time t = p (or
    # T - 1 - p when REVERSE); sub-tile k holds step k of every group, so each thread
    # owns whole groups and runs the R steps of a group sequentially in registers.
    BLOCK_T: tl.constexpr = G * R
    A_ONE: tl.constexpr = 0.0 if LOG_A else 1.0  # what masked steps load: the identity
    # The two options of the tile table. STAGES > 0: Triton's software pipeline
    # (asynchronous copies through shared memory, STAGES - 1 tiles ahead) replaces the
    # prefetch into registers. REREAD=False: each row's exclusive prefix comes from a scan
    # of its own group totals (``_entering_exclusive``) instead of re-reading the rows
    # of the group before it. The pipelined loop takes only that form: re-read rows
    # would get shared-memory buffers of their own.
    tl.static_assert(STAGES == 0 or not REREAD, "the pipelined loop (STAGES > 0) needs REREAD=False")
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
                                  G, R, BLOCK_D, LOG_A, A_ONE, REREAD)
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
                                  sign, groups, mask_d, n, G, R, BLOCK_D, LOG_A, A_ONE, REREAD)
            a_base += sign * BLOCK_T * s_at
            b_base += sign * BLOCK_T * s_bt
            h_base += sign * BLOCK_T * s_ht
            i += 1

    tl.store(hlast_ptr + pid_b * s_lb + (d0 + cols) * s_ld, carry.to(hlast_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _load_bwd_tile(a_base, h_base, g_base, off_a, off_at, off_h, off_g, s_at, s_ht, s_gt, sign, groups, mask_d, n, tile,
                   R: tl.constexpr, A_ONE: tl.constexpr, HAS_DH: tl.constexpr, LOG_A: tl.constexpr):
    """One backward tile's coefficients ``a`` (one step ahead), states ``h`` (one step
    behind) and incoming gradients as R sub-tiles, for tile number ``tile`` with ``n``
    positions left from its start. Tile 0's first position has no coefficient (``a`` past
    the end) and the last position no state before it (``h0``, taken by the caller).
    With ``LOG_A`` the coefficients get an R+1-th sub-tile: ``a_t`` at each group's last
    step (the next group's first coefficient, so a cache hit), which the gradient of
    ``log a`` needs; masked to the identity at the sequence's first step."""
    a_tile = ()
    h_tile = ()
    g_tile = ()
    for k in tl.static_range(R):
        p = groups * R + k
        m = (p < n)[:, None] & mask_d[None, :]
        a_tile = a_tile + (tl.load(a_base + sign * k * s_at + off_a, mask=m & ((p >= 1) | (tile > 0))[:, None], other=A_ONE),)
        h_tile = h_tile + (tl.load(h_base + sign * k * s_ht + off_h, mask=m & (p < n - 1)[:, None], other=0.0),)
        if HAS_DH:
            g_tile = g_tile + (tl.load(g_base + sign * k * s_gt + off_g, mask=m, other=0.0),)
    if LOG_A:
        m = (groups * R + R - 1 < n - 1)[:, None] & mask_d[None, :]
        a_tile = a_tile + (tl.load(a_base + sign * (R - 1) * s_at + off_at, mask=m, other=A_ONE),)
    return a_tile, h_tile, g_tile


@triton.jit
def _backward_tile(av, hv, gv, carry, h_before, a_base, g_base, da_base, db_base, off_a, off_g, off_da, off_db,
                   s_at, s_gt, s_dat, s_dbt, sign, groups, mask_d, n, tile,
                   G: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, LOG_A: tl.constexpr, A_ONE: tl.constexpr,
                   HAS_DH: tl.constexpr, HAS_H0: tl.constexpr, REREAD: tl.constexpr):
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
                         mask=m & ((p >= 1) | (tile > 0))[:, None], other=A_ONE)
            ak = _gate(ak, carry.dtype, LOG_A)
            pa = pa * ak
            pb = pb * ak
            if HAS_DH:
                gk = tl.load(g_base + sign * (k - R) * s_gt + off_g, mask=m, other=0.0)
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
        tl.store(db_base + sign * k * s_dbt + off_db, g.to(db_base.dtype.element_ty), mask=m)
        tl.store(da_base + sign * k * s_dat + off_da, da.to(da_base.dtype.element_ty), mask=m)
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
    G: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr = 0, REREAD: tl.constexpr = True,
):
    # REVERSE is the direction of the forward scan; this pass runs the other way, over
    # positions p (tiled as in the forward kernel) at times t = T-1-p, or t = p.
    # The coefficient at p is a at p - 1 (the forward's next step) and da needs h at
    # p + 1 (the forward's previous step; h0 past the end).
    BLOCK_T: tl.constexpr = G * R
    A_ONE: tl.constexpr = 0.0 if LOG_A else 1.0  # what masked steps load: the identity
    # STAGES, REREAD: as in the forward kernel.
    tl.static_assert(STAGES == 0 or not REREAD, "the pipelined loop (STAGES > 0) needs REREAD=False")
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
                                   G, R, BLOCK_D, LOG_A, A_ONE, HAS_DH, HAS_H0, REREAD)
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
                                   G, R, BLOCK_D, LOG_A, A_ONE, HAS_DH, HAS_H0, REREAD)
            a_base += sign * BLOCK_T * s_at
            h_base += sign * BLOCK_T * s_ht
            g_base += sign * BLOCK_T * s_gt
            da_base += sign * BLOCK_T * s_dat
            db_base += sign * BLOCK_T * s_dbt
            i += 1

    if HAS_H0:
        dh0 = a_first * carry  # carry: g at the first step
        tl.store(dh0_ptr + pid_b * s_dh0b + (d0 + cols) * s_dh0d, dh0.to(dh0_ptr.dtype.element_ty), mask=mask_d)


# Fewest tiles a program walks before the tile shrinks (short sequences): each program
# loads its first tile before it can compute, so a tile that covers most of the sequence
# leaves that latency exposed.
_MIN_TILES = 4


@functools.cache
def _device_info(device_index: int) -> tuple[int, str, int]:
    """Multiprocessor count, card name and shared memory a block may have, which pick the
    tile. get_device_properties costs microseconds; once per device is enough."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, props.name, getattr(props, "shared_memory_per_block_optin", 0)


def _base_tile(kind: str, log_space: bool, itemsize: int, card: str) -> tuple:
    """The table's tile for this pass, gates and dtype size on the card named ``card``."""
    for prefix, tiles in _CARD_CONFIGS.items():
        if itemsize == 2 and card.startswith(prefix) and (kind, log_space) in tiles:
            return tiles[kind, log_space]
    table = _LOG_CONFIGS[kind] if log_space and itemsize in _LOG_CONFIGS[kind] else _CONFIGS[kind]
    return table[itemsize]


@functools.lru_cache(maxsize=1024)
def _default_config(kind: str, log_space: bool, itemsize: int, sms: int, batch: int, length: int, dim: int, card: str = "",
                    shared_memory: int = 0) -> dict:
    """Tile for one call shape (cached: the launchers run it on every call). ``sms`` and
    ``shared_memory`` are 0 and ``card`` empty off CUDA (the interpreter)."""
    groups, steps, block_d, num_warps, *options = _base_tile(kind, log_space, itemsize, card)
    options = dict(options[0]) if options else {}  # kernel constexprs (STAGES, ...)
    if 0 < shared_memory < _PIPELINE_SHARED_MEMORY:
        options.pop("STAGES", None)
    block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
    # Halve the block while fewer than 7/8 of the multiprocessors would get a program. Not
    # all of them: wide rows are worth a few idle ones (on the H100, 128 programs of
    # 128-channel rows beat 256 of 64 channels; docs/notes/scan-kernel.md).
    while block_d > 16 and batch * triton.cdiv(dim, block_d) * 8 < sms * 7:
        block_d //= 2
    # Short sequences: shrink the groups first, then the steps per group.
    while groups > 8 and groups * steps * _MIN_TILES > length:
        groups //= 2
    while steps > 1 and groups * steps * _MIN_TILES > length:
        steps //= 2
    return {"G": groups, "R": steps, "BLOCK_D": block_d, "num_warps": num_warps, **options}


def _pick_config(kind: str, log_space: bool, device: torch.device, dtype: torch.dtype, batch: int, length: int, dim: int, config: dict | None):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms, card, shared_memory = _device_info(index)
    else:
        sms, card, shared_memory = 0, "", 0
    cfg = _default_config(kind, bool(log_space), dtype.itemsize, sms, batch, length, dim, card, shared_memory)
    if not config:
        return cfg
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"linear_scan config: unknown keys {unknown}; it takes {', '.join(_CONFIG_KEYS)}")
    cfg = {**cfg, **config}
    if cfg.get("STAGES", 0) > 0 and cfg.get("REREAD", True):
        raise ValueError(f"linear_scan config {config}: the pipelined loop (STAGES > 0) needs REREAD=False")
    return cfg


def _strides2(x: Tensor | None) -> tuple[int, int]:
    return (0, 0) if x is None else x.stride()


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
    """``(h, h_last)`` of ``h_t = a_t h_{t-1} + b_t`` along dim 1, as ``mmrec::linear_scan``.

    With ``log_space`` ``a`` holds ``log a``. ``out`` takes preallocated ``(h, h_last)``;
    ``accumulate_fp64`` carries the state in float64 whatever the input dtype;
    ``out_dtype`` stores ``h`` in that dtype and ``h_last`` in the accumulation dtype.
    ``config`` overrides the tile (keys ``G``, ``R``, ``BLOCK_D``, ``num_warps``, ``STAGES``,
    ``REREAD``; see ``_CONFIGS``).
    """
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
    cfg = _pick_config("fwd", log_space, b.device, dtype, batch, length, dim, config)
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
    """``(grad_a, grad_b, grad_h0)`` in one pass, as ``mmrec::linear_scan_backward``.

    ``h`` holds the forward states (in any dtype: the inputs' or a forward ``out_dtype``);
    ``grad_h`` / ``grad_h_last`` the incoming gradients (either may be None). With ``log_space`` ``a`` holds ``log a`` and ``grad_a`` is the
    gradient of ``log a``. ``grad_h0`` is an empty tensor when ``h0`` is None.
    """
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
    cfg = _pick_config("bwd", log_space, h.device, h.dtype, batch, length, dim, config)
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

"""Triton kernels of ``mmrec::linear_scan`` against the float64 step-by-step reference.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, which
must be set before Triton is imported, so those checks run in a child process that
executes this file). On CUDA they run compiled, through the op and its autograd.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mmrec.ops.linear_scan import linear_scan, linear_scan_reference
from tests.helpers import run_under_triton_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert x.shape == ref.shape
    assert torch.isfinite(x).all(), "non-finite values (unwritten output?)"
    scale = ref.norm().item()
    return (x - ref).norm().item() / (scale if scale > 0 else 1.0)


def make_inputs(batch, length, dim, dtype, device, gen, layout="contiguous", log_space=False):
    """Decays in (-1, -0.5] u [0.5, 1), mostly positive; inputs and states N(0, 1).

    With ``log_space``, ``a`` is ``log a``: mostly in (-1.5, 0], a fifth in (-200, -50],
    where ``exp`` underflows in float32 (and products of such decays in any dtype).
    """

    def draw(fn, *shape):
        return fn(*shape, generator=gen, dtype=torch.float64)

    if log_space:
        a = -1.5 * draw(torch.rand, batch, length, dim)
        a = torch.where(draw(torch.rand, batch, length, dim) < 0.2, -50 - 150 * draw(torch.rand, batch, length, dim), a)
    else:
        a = draw(torch.rand, batch, length, dim) * 0.5 + 0.5
        a = torch.where(draw(torch.rand, batch, length, dim) < 0.2, -a, a)
    b = draw(torch.randn, batch, length, dim)
    if layout == "strided":  # a: time-major transpose, b: every other channel
        a = a.to(dtype).to(device).transpose(1, 2).contiguous().transpose(1, 2)
        b = torch.cat([b, b], dim=2).to(dtype).to(device)[:, :, ::2]
        assert length == 1 or not (a.is_contiguous() or b.is_contiguous())
        return a, b
    if layout == "broadcast":  # a constant over time (stride 0)
        a = a[:, :1].to(dtype).to(device).expand(batch, length, dim)
        return a, b.to(dtype).to(device)
    return a.to(dtype).to(device), b.to(dtype).to(device)


def reference_scan(a, b, h0, reverse, log_space=False):
    """Step-by-step loop in float64 built with torch.stack, so autograd can follow it."""
    if log_space:
        a = a.exp()
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
    out = [None] * a.shape[1]
    for t in steps:
        h = a[:, t] * h + b[:, t]
        out[t] = h
    return torch.stack(out, dim=1), h


def reference_grads(a, b, h0, reverse, grad_h, grad_h_last, log_space=False):
    leaves = [x.detach().cpu().double().requires_grad_() for x in (a, b)]
    if h0 is not None:
        leaves.append(h0.detach().cpu().double().requires_grad_())
    h, h_last = reference_scan(leaves[0], leaves[1], leaves[2] if h0 is not None else None, reverse, log_space)
    loss = (h * grad_h.cpu().double()).sum()
    if grad_h_last is not None:
        loss = loss + (h_last * grad_h_last.cpu().double()).sum()
    loss.backward()
    return [x.grad for x in leaves]


# ----------------------------------------------------------------------- interpreter


SMALL = {"G": 4, "R": 4, "BLOCK_D": 16}  # 16-step tiles, 16-channel blocks


def _interpreter_checks() -> None:
    """Run in a child process with TRITON_INTERPRET=1: small shapes, tiny tiles."""
    from mmrec.ops import linear_scan_triton as kernels

    small = SMALL
    cases = [
        # dtype, T, reverse, h0, layout, grad_h, grad_h_last, extra
        (torch.float32, 21, False, False, "contiguous", True, False, {}),
        (torch.float32, 21, True, True, "strided", True, True, {}),
        (torch.float32, 16, False, True, "broadcast", False, True, {}),
        (torch.bfloat16, 21, False, True, "contiguous", True, True, {}),
        (torch.bfloat16, 7, True, False, "strided", True, False, {}),
        (torch.float32, 1, True, True, "contiguous", True, True, {}),
        (torch.float64, 20, True, True, "contiguous", True, True, {}),
        (torch.float32, 21, False, True, "contiguous", True, True, {"accumulate_fp64": True}),
        (torch.bfloat16, 5, True, True, "contiguous", True, True, {"config": None}),  # default tiles
        (torch.float32, 21, True, True, "strided", True, True, {"log_space": True}),
        (torch.float32, 16, False, True, "broadcast", False, True, {"log_space": True}),
        (torch.bfloat16, 21, False, True, "contiguous", True, True, {"log_space": True}),
        (torch.float16, 7, True, False, "contiguous", True, True, {"log_space": True}),
        (torch.float32, 20, False, True, "contiguous", True, True, {"log_space": True, "accumulate_fp64": True}),
        # h stored narrower than the state (out_dtype), h_last in the accumulation dtype
        (torch.bfloat16, 21, False, True, "contiguous", True, True, {"log_space": True, "out_dtype": torch.bfloat16}),
        (torch.float32, 21, True, True, "broadcast", True, True, {"out_dtype": torch.bfloat16}),
        # the software-pipelined loop (STAGES), which takes its prefixes from the rows' own totals
        (torch.float32, 37, True, True, "strided", True, True, {"config": {**small, "STAGES": 3, "REREAD": False}}),
        (torch.bfloat16, 21, False, True, "contiguous", True, True,
         {"log_space": True, "config": {**small, "STAGES": 2, "REREAD": False}}),
        # exclusive prefixes from the rows' own totals (REREAD=False) in the register-prefetch loop
        (torch.float32, 37, True, True, "strided", True, True, {"config": {**small, "REREAD": False}}),
        (torch.float32, 16, False, True, "broadcast", False, True, {"log_space": True, "config": {**small, "REREAD": False, "STAGES": 2}}),
        # log space with h0: the first step's a_t reaches the gradient through h0, with that
        # step inside a group (T=38: the last tile's step 5) and at a group's end (T=16 above)
        (torch.float32, 38, True, True, "contiguous", True, True, {"log_space": True, "config": {**small, "REREAD": False}}),
    ]
    check_cases(kernels, cases, torch.Generator().manual_seed(0))
    _fp64_accumulation_check(kernels)


def check_cases(kernels, cases, gen) -> None:
    """Each case through ``kernels.scan_forward`` and ``kernels.scan_backward`` (a module
    with the launchers' signatures) against the float64 reference; prints "ok" per case."""
    batch, dim = 2, 20  # 20 channels: a full block and a partial one
    for dtype, length, reverse, with_h0, layout, with_gh, with_ghl, extra in cases:
        extra = {"config": SMALL, **extra}
        log_space = extra.get("log_space", False)
        a, b = make_inputs(batch, length, dim, dtype, "cpu", gen, layout, log_space)
        h0 = torch.randn(batch, dim, generator=gen).to(dtype) if with_h0 else None
        # with out_dtype: h in it, h_last in the accumulation dtype (float32 here)
        h_dtype = extra.get("out_dtype", dtype)
        last_dtype = dtype if "out_dtype" not in extra else torch.float32
        tols = {"h": TOL[h_dtype], "h_last": TOL[last_dtype], "da": 3 * TOL[h_dtype], "db": TOL[dtype], "dh0": TOL[dtype]}
        ref_h, ref_last = linear_scan_reference(a.double(), b.double(), None if h0 is None else h0.double(), reverse, log_space=log_space)

        out = (torch.full((batch, length, dim), float("nan"), dtype=h_dtype), torch.full((batch, dim), float("nan"), dtype=last_dtype))
        h, h_last = kernels.scan_forward(a, b, h0, reverse, out=out, **extra)
        errs = {"h": rel_err(h, ref_h), "h_last": rel_err(h_last, ref_last)}
        bwd_extra = {k: v for k, v in extra.items() if k != "out_dtype"}  # the backward reads h in any dtype

        grad_h = torch.randn(batch, length, dim, generator=gen).to(h_dtype) if with_gh else None
        grad_hl = torch.randn(batch, dim, generator=gen).to(last_dtype) if with_ghl else None
        gouts = (
            torch.full((batch, length, dim), float("nan"), dtype=a.dtype),
            torch.full((batch, length, dim), float("nan"), dtype=b.dtype),
            torch.full((batch, dim), float("nan"), dtype=dtype) if with_h0 else torch.empty(0, dtype=dtype),
        )
        grads = kernels.scan_backward(a, h, grad_h, grad_hl, h0, reverse, b.dtype, out=gouts, **bwd_extra)
        gh_for_ref = grad_h if grad_h is not None else torch.zeros(batch, length, dim)
        refs = reference_grads(a, b, h0, reverse, gh_for_ref, grad_hl, log_space)
        for name, got, ref in zip(("da", "db", "dh0"), grads, refs):
            errs[name] = rel_err(got, ref)
        # grad_a uses the stored (rounded) states, so allow the rounding of h as well
        bad = {k: v for k, v in errs.items() if v > tols[k]}
        label = f"{dtype} T={length} reverse={reverse} h0={with_h0} {layout} { {k: v for k, v in extra.items() if k != 'config' or v is not SMALL} }"
        assert not bad, f"{label}: {bad}"
        print(f"ok {label}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


def drifting_inputs(length, dim, gen):
    """float32 inputs whose float32 accumulation drifts: a in (1 - 1e-5, 1], b > 0, so the
    states grow like a running sum and every step rounds a large state."""
    a = 1 - 1e-5 * torch.rand(1, length, dim, generator=gen)
    b = 0.5 + torch.rand(1, length, dim, generator=gen)
    return a, b, torch.randn(1, length, dim, generator=gen)


def _fp64_accumulation_check(kernels) -> None:
    gen = torch.Generator().manual_seed(1)
    a, b, grad_h = drifting_inputs(3000, 5, gen)
    ref_h, _ = linear_scan_reference(a.double(), b.double())
    ref_db = linear_scan_reference(a.double()[:, 1:], grad_h.double()[:, :-1], grad_h.double()[:, -1], reverse=True)[0]
    errs = {}
    for fp64 in (False, True):
        h, _ = kernels.scan_forward(a, b, accumulate_fp64=fp64)
        _, db, _ = kernels.scan_backward(a, h, grad_h, accumulate_fp64=fp64)
        errs[fp64] = rel_err(h, ref_h), rel_err(db[:, :-1], ref_db)
    # fp64 leaves only the final rounding to float32; fp32 rounds every step
    for i, name in enumerate(("h", "db")):
        assert errs[True][i] < 1e-7 and errs[True][i] * 4 < errs[False][i], f"{name}: {errs}"
    print(f"ok fp64 accumulation: fp32 {errs[False]} fp64 {errs[True]}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_triton_interpreter():
    out = run_under_triton_interpreter(__file__)
    assert out.count("ok ") == 22, out


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_config_takes_the_tile_and_its_two_options():
    """``config`` overrides take the tile shape, STAGES and REREAD; anything else, and the
    pipelined loop with the re-read, is refused with the keys it takes. Every tile of the
    tables passes the same check."""
    from mmrec.ops import linear_scan_triton as kernels

    def pick(config, kind="fwd", log_space=False, dtype=torch.bfloat16):
        return kernels._pick_config(kind, log_space, torch.device("cpu"), dtype, 4, 32768, 4096, config)

    assert pick({"G": 8, "R": 2, "STAGES": 3, "REREAD": False}) == {**pick(None), "G": 8, "R": 2, "STAGES": 3, "REREAD": False}
    with pytest.raises(ValueError, match=r"unknown keys \['STREAM'\]; it takes G, R, BLOCK_D, num_warps, STAGES, REREAD"):
        pick({"STREAM": True})
    with pytest.raises(ValueError, match="the pipelined loop"):
        pick({"STAGES": 3}, dtype=torch.float32)  # its table tile re-reads
    with pytest.raises(ValueError, match="the pipelined loop"):
        pick({"STAGES": 3, "REREAD": True})
    tables = [kernels._CONFIGS, kernels._LOG_CONFIGS]
    tiles = [tile for table in tables for sizes in table.values() for tile in sizes.values()]
    tiles += [tile for card in kernels._CARD_CONFIGS.values() for tile in card.values()]
    assert len(tiles) == 12
    for groups, steps, block_d, warps, *options in tiles:
        config = {"G": groups, "R": steps, "BLOCK_D": block_d, "num_warps": warps, **(options[0] if options else {})}
        assert pick(config) == {**pick(None), **config}


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_tiles_follow_the_card():
    """2-byte tiles come from the card's own sweep where it has one (an H200), else from
    the default table (the H100's); other dtype sizes and the interpreter use the table.
    Blocks narrow only when too few multiprocessors would get a program, and cards with
    less shared memory than Hopper run the same shapes without the software pipeline."""
    from mmrec.ops import linear_scan_triton as kernels

    def tile(kind, log_space, card, itemsize=2, batch=4, shared_memory=0):
        return kernels._default_config(kind, log_space, itemsize, 132, batch, 32768, 4096, card, shared_memory)

    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    assert tile("bwd", True, h200)["STAGES"] == 3 and tile("bwd", True, h200)["BLOCK_D"] == 64
    assert tile("bwd", True, h100)["BLOCK_D"] == 128 and "STAGES" not in tile("bwd", True, h100)
    assert tile("bwd", False, h200)["REREAD"] is False and tile("bwd", False, h200)["G"] == 32
    assert tile("fwd", False, h200)["R"] == 8 and tile("fwd", False, h100)["STAGES"] == 3
    assert tile("bwd", True, "NVIDIA A100-SXM4-80GB") == tile("bwd", True, h100) == tile("bwd", True, "")
    assert tile("bwd", True, h200, itemsize=4) == tile("bwd", True, h100, itemsize=4)
    # 4 x 4096 channels in 128-wide blocks: 128 programs for 132 multiprocessors, kept;
    # one sequence: 32 programs, so blocks halve until 128 programs of 32 channels
    assert tile("fwd", False, h100)["BLOCK_D"] == 128 and tile("fwd", False, h100, batch=1)["BLOCK_D"] == 32
    small_card = tile("fwd", True, h100, shared_memory=99 * 1024)
    hopper = tile("fwd", True, h100, shared_memory=227 * 1024)
    assert hopper == tile("fwd", True, h100) and hopper["STAGES"] == 3
    assert {k: v for k, v in hopper.items() if k != "STAGES"} == small_card


# ----------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")


@cuda_only
@pytest.mark.parametrize("length", [1, 7, 1000, 4097])
@pytest.mark.parametrize(
    "dtype,reverse,with_h0,layout,log_space",
    [
        (torch.float32, False, False, "contiguous", False),
        (torch.float32, True, True, "strided", False),
        (torch.bfloat16, False, True, "contiguous", False),
        (torch.bfloat16, True, False, "strided", False),
        (torch.float16, False, True, "broadcast", False),
        (torch.float64, True, True, "contiguous", False),
        (torch.float32, True, True, "strided", True),
        (torch.bfloat16, False, True, "contiguous", True),
        (torch.bfloat16, True, False, "broadcast", True),
        (torch.float16, False, True, "contiguous", True),
    ],
)
def test_cuda_op_forward_and_gradients(length, dtype, reverse, with_h0, layout, log_space):
    gen = torch.Generator().manual_seed(length * 7 + int(reverse))
    batch, dim = 3, 200  # 200 channels: not a multiple of any block width
    a, b = make_inputs(batch, length, dim, dtype, "cuda", gen, layout, log_space)
    a.requires_grad_()
    b.requires_grad_()
    h0 = torch.randn(batch, dim, generator=gen).to(dtype).cuda().requires_grad_() if with_h0 else None
    h, h_last = linear_scan(a, b, h0, reverse, log_space=log_space)
    assert h.dtype == dtype and h_last.shape == (batch, dim)
    ref_h, ref_last = linear_scan_reference(
        a.detach().cpu().double(), b.detach().cpu().double(), None if h0 is None else h0.detach().cpu().double(), reverse, log_space=log_space
    )
    assert rel_err(h, ref_h) < TOL[dtype]
    assert rel_err(h_last, ref_last) < TOL[dtype]

    grad_h = torch.randn(batch, length, dim, generator=gen).to(dtype).cuda()
    grad_hl = torch.randn(batch, dim, generator=gen).to(dtype).cuda()
    inputs = [a, b] + ([h0] if with_h0 else [])
    grads = torch.autograd.grad([h, h_last], inputs, [grad_h, grad_hl])
    refs = reference_grads(a, b, h0, reverse, grad_h, grad_hl, log_space)
    for name, got, ref in zip(("da", "db", "dh0"), grads, refs):
        assert got.dtype == dtype
        tol = 3 * TOL[dtype] if name == "da" else TOL[dtype]
        assert rel_err(got, ref) < tol, name


@cuda_only
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_outputs_fully_written(reverse):
    from mmrec.ops import linear_scan_triton as kernels

    gen = torch.Generator().manual_seed(5)
    batch, length, dim = 2, 1000, 4100
    a, b = make_inputs(batch, length, dim, torch.bfloat16, "cuda", gen)
    h0 = torch.randn(batch, dim, generator=gen).bfloat16().cuda()
    nan = float("nan")
    h = torch.full((batch, length, dim), nan, dtype=torch.bfloat16, device="cuda")
    h_last = torch.full((batch, dim), nan, dtype=torch.bfloat16, device="cuda")
    kernels.scan_forward(a, b, h0, reverse, out=(h, h_last))
    assert not h.isnan().any() and not h_last.isnan().any()
    outs = [torch.full_like(h, nan), torch.full_like(h, nan), torch.full_like(h_last, nan)]
    grad_h = torch.randn(batch, length, dim, generator=gen).bfloat16().cuda()
    kernels.scan_backward(a, h, grad_h, None, h0, reverse, torch.bfloat16, out=tuple(outs))
    assert not any(o.isnan().any() for o in outs)
    ref_h, _ = linear_scan_reference(a.cpu().double(), b.cpu().double(), h0.cpu().double(), reverse)
    assert rel_err(h, ref_h) < 1e-2


@cuda_only
@pytest.mark.parametrize("log_space", [False, True])
@pytest.mark.parametrize("options", [{"REREAD": False}, {"STAGES": 3, "REREAD": False}], ids=str)
def test_cuda_kernel_options_agree_with_the_reference(options, log_space):
    """The kernels' options (no re-read, and with it the software pipeline), compiled for
    the GPU, on a length that ends mid-tile, float32 against the float64 reference."""
    from mmrec.ops import linear_scan_triton as kernels

    gen = torch.Generator().manual_seed(7)
    batch, length, dim = 2, 1234, 200
    a, b = make_inputs(batch, length, dim, torch.float32, "cuda", gen, log_space=log_space)
    h0 = torch.randn(batch, dim, generator=gen).cuda()
    grad_h, grad_hl = torch.randn(batch, length, dim, generator=gen).cuda(), torch.randn(batch, dim, generator=gen).cuda()
    config = {"G": 16, "R": 4, "BLOCK_D": 64, "num_warps": 4, **options}
    for reverse in (False, True):
        h, h_last = kernels.scan_forward(a, b, h0, reverse, log_space=log_space, config=config)
        grads = kernels.scan_backward(a, h, grad_h, grad_hl, h0, reverse, b.dtype, log_space=log_space, config=config)
        ref_h, ref_last = linear_scan_reference(a.double(), b.double(), h0.double(), reverse, log_space=log_space)
        refs = reference_grads(a, b, h0, reverse, grad_h, grad_hl, log_space)
        tol = TOL[torch.float32]
        assert rel_err(h, ref_h) < tol and rel_err(h_last, ref_last) < tol, reverse
        for name, got, ref in zip(("da", "db", "dh0"), grads, refs):
            assert rel_err(got, ref) < (3 * tol if name == "da" else tol), (name, reverse)


@cuda_only
def test_cuda_fp64_accumulation_option():
    gen = torch.Generator().manual_seed(6)
    a, b, grad_h = drifting_inputs(20000, 64, gen)
    ref_h, _ = linear_scan_reference(a.double(), b.double())
    ref_db, _ = linear_scan_reference(a.double()[:, 1:], grad_h.double()[:, :-1], grad_h.double()[:, -1], reverse=True)
    errs = {}
    for fp64 in (False, True):
        args = [t.cuda().requires_grad_() for t in (a, b)]
        h, _ = linear_scan(*args, accumulate_fp64=fp64)
        assert h.dtype == torch.float32
        _, db = torch.autograd.grad(h, args, grad_h.cuda())
        errs[fp64] = rel_err(h, ref_h), rel_err(db[:, :-1], ref_db)
    for err32, err64 in zip(errs[False], errs[True]):
        assert err64 < 1e-7 and 4 * err64 < err32, errs


@cuda_only
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_opcheck(reverse):
    gen = torch.Generator().manual_seed(7)
    a, b = make_inputs(2, 70, 33, torch.float32, "cuda", gen)
    h0 = torch.randn(2, 33, generator=gen).cuda()
    args = (a.requires_grad_(), b.requires_grad_(), h0.requires_grad_(), reverse)
    torch.library.opcheck(torch.ops.mmrec.linear_scan.default, args)
    h, _ = linear_scan(a.detach(), b.detach(), h0.detach(), reverse)
    bwd_args = (a.detach(), h, torch.randn_like(h), torch.randn_like(h0), h0.detach(), reverse, torch.float32)
    torch.library.opcheck(torch.ops.mmrec.linear_scan_backward.default, bwd_args)
    # log space (log a < 0) and float64 accumulation
    log_a = -a.detach().abs().log1p()
    torch.library.opcheck(torch.ops.mmrec.linear_scan.default, (log_a.requires_grad_(), b, h0, reverse, True, False))
    torch.library.opcheck(torch.ops.mmrec.linear_scan.default, (log_a, b, h0, reverse, True, True))
    h, _ = linear_scan(log_a.detach(), b.detach(), h0.detach(), reverse, log_space=True)
    bwd_args = (log_a.detach(), h, torch.randn_like(h), None, h0.detach(), reverse, torch.float32, True, True)
    torch.library.opcheck(torch.ops.mmrec.linear_scan_backward.default, bwd_args)


@cuda_only
@pytest.mark.parametrize("dtype,log_space", [(torch.bfloat16, True), (torch.float32, True), (torch.float32, False)])
def test_cuda_out_dtype(dtype, log_space):
    """h stored in bf16, h_last in float32, through the op and its autograd, and opcheck."""
    gen = torch.Generator().manual_seed(9)
    batch, length, dim = 2, 1000, 200
    a, b = make_inputs(batch, length, dim, dtype, "cuda", gen, "contiguous", log_space)
    h0 = torch.randn(batch, dim, generator=gen).to(dtype).cuda()
    args = [t.requires_grad_() for t in (a, b, h0)]
    h, h_last = linear_scan(*args, log_space=log_space, out_dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    ref_h, ref_last = linear_scan_reference(a.detach().cpu().double(), b.detach().cpu().double(), h0.detach().cpu().double(), log_space=log_space)
    assert rel_err(h, ref_h) < 1e-2
    assert rel_err(h_last, ref_last) < 1e-5
    grad_h = torch.randn(batch, length, dim, generator=gen).bfloat16().cuda()
    grad_hl = torch.randn(batch, dim, generator=gen).cuda()
    grads = torch.autograd.grad([h, h_last], args, [grad_h, grad_hl])
    refs = reference_grads(a, b, h0, False, grad_h, grad_hl, log_space)
    for name, got, ref in zip(("da", "db", "dh0"), grads, refs):
        assert got.dtype == dtype
        assert rel_err(got, ref) < (3e-2 if name == "da" else TOL[dtype]), name  # da reads the bf16 h
    op_args = (a.detach().requires_grad_(), b.detach().requires_grad_(), h0.detach().requires_grad_(), False, log_space, False, torch.bfloat16)
    torch.library.opcheck(torch.ops.mmrec.linear_scan.default, op_args)


@cuda_only
def test_cuda_matches_cpu_op_and_compiles():
    gen = torch.Generator().manual_seed(8)
    a, b = make_inputs(2, 300, 48, torch.float32, "cpu", gen)
    cpu_h, _ = linear_scan(a, b)
    fn = torch.compile(lambda a, b: linear_scan(a, b)[0] * 2, fullgraph=True)
    gpu_h = fn(a.cuda(), b.cuda())
    assert rel_err(gpu_h, 2 * cpu_h) < 1e-5


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_log_space_takes_minus_infinity(dtype):
    """A document reset of the parallel recurrence: ``log a = −∞`` at some steps (and at the
    first) gives ``a = 0`` there, the state starts again from that step's input, and every
    gradient stays finite (the decay's is 0 where it is −∞)."""
    gen = torch.Generator().manual_seed(5)
    batch, length, dim = 2, 3000, 200
    a, b = make_inputs(batch, length, dim, torch.float64, "cpu", gen, log_space=True)
    a[:, [0, 1, 700, 701, 2048]] = float("-inf")
    a, b = a.to(dtype).cuda().requires_grad_(), b.to(dtype).cuda().requires_grad_()
    h0 = torch.randn(batch, dim, generator=gen).to(dtype).cuda().requires_grad_()
    h, h_last = linear_scan(a, b, h0, log_space=True)
    ref_h, ref_last = linear_scan_reference(a.detach().cpu().double(), b.detach().cpu().double(),
                                            h0.detach().cpu().double(), log_space=True)
    assert rel_err(h, ref_h) < TOL[dtype] and rel_err(h_last, ref_last) < TOL[dtype]
    assert torch.equal(h[:, 700], b[:, 700].detach())  # nothing of the state before the reset
    grads = torch.autograd.grad([h, h_last], [a, b, h0], [torch.randn_like(h), torch.randn_like(h_last)])
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][:, [0, 700, 2048]].abs().max() == 0 and grads[2].abs().max() == 0  # h0 is reset at once


if __name__ == "__main__":
    _interpreter_checks()

import pytest
import torch

from mmrec.ops import linear_scan, linear_scan_reference
from tests.helpers import rel_err


def inputs(batch, length, dim, dtype=torch.float64, low=0.5, high=1.0, h0=True):
    a = torch.empty(batch, length, dim, dtype=dtype).uniform_(low, high)
    b = torch.randn(batch, length, dim, dtype=dtype)
    return a, b, (torch.randn(batch, dim, dtype=dtype) if h0 else None)


@pytest.mark.parametrize("length", [1, 7, 64, 65, 1000, 4097])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_loop_float64(length, reverse, with_h0):
    a, b, h0 = inputs(2, length, 5, h0=with_h0)
    h, h_last = linear_scan(a, b, h0, reverse)
    ref, ref_last = linear_scan_reference(a, b, h0, reverse)
    assert h.dtype == torch.float64
    assert rel_err(h, ref) < 1e-6
    assert rel_err(h_last, ref_last) < 1e-6
    torch.testing.assert_close(h_last, h[:, 0] if reverse else h[:, -1])


@pytest.mark.parametrize("length", [1, 33, 999])
@pytest.mark.parametrize("reverse", [False, True])
def test_float32_against_float64_loop(length, reverse):
    a, b, h0 = inputs(3, length, 7)
    h, h_last = linear_scan(a.float(), b.float(), h0.float(), reverse)
    ref, ref_last = linear_scan_reference(a, b, h0, reverse)
    assert h.dtype == torch.float32
    assert rel_err(h, ref) < 1e-5
    assert rel_err(h_last, ref_last) < 1e-5


def test_negative_and_large_gates():
    # a is not a decay here: signs alternate and |a| > 1 in places; no logarithms to break
    a = torch.randn(2, 200, 3, dtype=torch.float64) * 1.05
    b = torch.randn(2, 200, 3, dtype=torch.float64)
    assert rel_err(linear_scan(a, b)[0], linear_scan_reference(a, b)[0]) < 1e-6


def test_bfloat16_inputs_accumulate_in_float32():
    a, b, h0 = inputs(2, 300, 9)
    h, _ = linear_scan(a.bfloat16(), b.bfloat16(), h0.bfloat16())
    ref, _ = linear_scan_reference(a.bfloat16().double(), b.bfloat16().double(), h0.bfloat16().double())
    assert h.dtype == torch.bfloat16
    assert rel_err(h, ref) < 1e-2


@pytest.mark.parametrize("low,high", [(0.0, 1e-6), (1 - 1e-6, 1.0)])
def test_extreme_gates_over_32k_steps(low, high):
    a, b, h0 = inputs(1, 32768, 3, dtype=torch.float32, low=low, high=high)
    h, h_last = linear_scan(a, b, h0)
    assert torch.isfinite(h).all() and torch.isfinite(h_last).all()
    ref, _ = linear_scan_reference(a.double()[:, :2000], b.double()[:, :2000], h0.double())
    assert rel_err(h[:, :2000], ref) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_float64_autograd_of_the_loop(reverse):
    a, b, h0 = inputs(2, 37, 3)
    args = [t.clone().requires_grad_() for t in (a, b, h0)]
    ref_args = [t.clone().requires_grad_() for t in (a, b, h0)]
    weights = torch.randn(2, 37, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    h, h_last = linear_scan(*args, reverse=reverse)
    ((h * weights[0]).sum() + (h_last * weights[1]).sum()).backward()
    ref, ref_last = linear_scan_reference(*ref_args, reverse=reverse)
    ((ref * weights[0]).sum() + (ref_last * weights[1]).sum()).backward()
    for got, want in zip(args, ref_args):
        assert rel_err(got.grad, want.grad) < 1e-10


def test_gradcheck_and_opcheck():
    a, b, h0 = (t.requires_grad_() for t in inputs(2, 70, 3))
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, reverse), (a, b, h0))
        assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a.log(), b, h0, reverse, log_space=True), (a, b, h0))
    op = torch.ops.mmrec.linear_scan.default
    torch.library.opcheck(op, (a, b, h0, False))
    torch.library.opcheck(op, (a, b, None, True))
    # log space and float64 accumulation, on float32 inputs
    log_a = -torch.rand(2, 70, 3).mul(3).requires_grad_()
    b32, h032 = b.detach().float().requires_grad_(), h0.detach().float().requires_grad_()
    torch.library.opcheck(op, (log_a, b32, h032, False, True, False))
    torch.library.opcheck(op, (log_a, b32, None, True, True, True))
    torch.library.opcheck(op, (a.detach().float(), b32, h032, True, False, True))
    h, _ = linear_scan(log_a.detach(), b32.detach(), h032.detach(), log_space=True)
    bwd = torch.ops.mmrec.linear_scan_backward.default
    torch.library.opcheck(bwd, (log_a.detach(), h, torch.randn_like(h), torch.randn_like(h032), h032.detach(), False, torch.float32, True, True))
    torch.library.opcheck(bwd, (log_a.detach(), h, None, torch.randn_like(h032), None, True, torch.float32, False, False))


def log_inputs(batch, length, dim, dtype=torch.float64):
    """log a mostly in (-1.5, 0], a fifth in (-200, -50] (exp underflows in float32 there)."""
    log_a = -1.5 * torch.rand(batch, length, dim, dtype=torch.float64)
    log_a = torch.where(torch.rand_like(log_a) < 0.2, -50 - 150 * torch.rand_like(log_a), log_a)
    return log_a.to(dtype), torch.randn(batch, length, dim, dtype=dtype), torch.randn(batch, dim, dtype=dtype)


@pytest.mark.parametrize("length", [1, 7, 65, 1000])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_log_space_forward_and_gradients(length, reverse, dtype, tol):
    log_a, b, h0 = log_inputs(2, length, 5, dtype)
    weights = torch.randn(2, length, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (log_a, b, h0)]
    h, h_last = linear_scan(*args, reverse=reverse, log_space=True)
    ((h.double() * weights[0]).sum() + (h_last.double() * weights[1]).sum()).backward()
    ref_args = [t.double().requires_grad_() for t in (log_a, b, h0)]
    ref, ref_last = linear_scan_reference(*ref_args, reverse=reverse, log_space=True)
    ((ref * weights[0]).sum() + (ref_last * weights[1]).sum()).backward()
    assert h.dtype == dtype
    for got, want in [(h, ref), (h_last, ref_last)] + [(x.grad, r.grad) for x, r in zip(args, ref_args)]:
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < (3 * tol if got is args[0].grad else tol)


def test_log_space_keeps_decays_near_one():
    # exp(-1e-3) rounds to 1 in bfloat16 (its spacing there is 2^-8); log a = -1e-3 does
    # not, so over 3000 steps the state stays bounded near 1/(1 - a) ~ 1000
    log_a = torch.full((1, 3000, 2), -1e-3, dtype=torch.bfloat16)
    b = torch.ones(1, 3000, 2, dtype=torch.bfloat16)
    ref, _ = linear_scan_reference(log_a.double(), b.double(), log_space=True)
    assert rel_err(linear_scan(log_a, b, log_space=True)[0], ref) < 1e-2
    assert rel_err(linear_scan(log_a.exp(), b)[0], ref) > 0.3


def drifting_inputs(length, dim, seed=0):
    """float32 inputs whose float32 accumulation drifts: a in (1 - 1e-5, 1], b > 0, so the
    states grow like a running sum and every step rounds a large state."""
    gen = torch.Generator().manual_seed(seed)
    a = 1 - 1e-5 * torch.rand(1, length, dim, generator=gen)
    b = 0.5 + torch.rand(1, length, dim, generator=gen)
    return a, b, torch.randn(1, length, dim, generator=gen)


def test_accumulate_fp64_is_closer_to_the_float64_loop():
    a, b, grad_h = drifting_inputs(10000, 4)
    a64, b64, gh64 = a.double(), b.double(), grad_h.double()
    ref_h, _ = linear_scan_reference(a64, b64)
    # gradients by the adjoint loop (autograd through 10000 steps would be slow)
    ref_db, _ = linear_scan_reference(torch.cat([a64[:, 1:], torch.ones_like(a64[:, :1])], 1), gh64, reverse=True)
    ref_da = ref_db * torch.cat([torch.zeros_like(ref_h[:, :1]), ref_h[:, :-1]], 1)
    errs = {}
    for fp64 in (False, True):
        args = [t.clone().requires_grad_() for t in (a, b)]
        h, h_last = linear_scan(*args, accumulate_fp64=fp64)
        assert h.dtype == h_last.dtype == torch.float32
        da, db = torch.autograd.grad(h, args, grad_h)
        errs[fp64] = [rel_err(h, ref_h), rel_err(da, ref_da), rel_err(db, ref_db)]
    # float64 leaves only the final rounding to float32; float32 rounds at every level
    for err32, err64 in zip(errs[False], errs[True]):
        assert err64 < 1e-7 and 4 * err64 < err32, errs


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("log_space", [False, True])
def test_out_dtype_stores_h_narrower_and_carries_h_last_at_full_precision(reverse, log_space):
    # float64 inputs, h stored in float32: h is the float64 state rounded once, h_last float64
    a, b, h0 = log_inputs(2, 77, 5) if log_space else inputs(2, 77, 5)
    args = [t.clone().requires_grad_() for t in (a, b, h0)]
    h, h_last = linear_scan(*args, reverse, log_space=log_space, out_dtype=torch.float32)
    assert h.dtype == torch.float32 and h_last.dtype == torch.float64
    ref_args = [t.clone().requires_grad_() for t in (a, b, h0)]
    ref, ref_last = linear_scan_reference(*ref_args, reverse, log_space=log_space)
    assert rel_err(h, ref) < 1e-6
    assert rel_err(h_last, ref_last) < 1e-12
    weights = torch.randn(2, 77, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    ((h * weights[0]).sum() + (h_last * weights[1]).sum()).backward()
    ((ref * weights[0].float()).sum() + (ref_last * weights[1]).sum()).backward()
    for got, want in zip(args, ref_args):
        assert got.grad.dtype == torch.float64
        assert rel_err(got.grad, want.grad) < 1e-6  # grad_a reads the float32 h


def test_out_dtype_bfloat16_h_with_float32_h_last():
    log_a, b, h0 = (t.bfloat16() for t in log_inputs(3, 300, 7))
    h, h_last = linear_scan(log_a, b, h0, log_space=True, out_dtype=torch.bfloat16)
    ref, ref_last = linear_scan_reference(log_a.double(), b.double(), h0.double(), log_space=True)
    assert h.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    assert rel_err(h, ref) < 1e-2
    assert rel_err(h_last, ref_last) < 1e-5  # not rounded to bf16 (about 2e-3)
    # pieces carried through h_last give one pass
    first, mid = linear_scan(log_a[:, :123], b[:, :123], h0, log_space=True, out_dtype=torch.bfloat16)
    second, last = linear_scan(log_a[:, 123:], b[:, 123:], mid, log_space=True, out_dtype=torch.bfloat16)
    assert rel_err(torch.cat([first, second], 1), ref) < 1e-2
    assert rel_err(last, ref_last) < 1e-5


def test_out_dtype_opcheck():
    op = torch.ops.mmrec.linear_scan.default
    log_a, b, h0 = (t.float().requires_grad_() for t in log_inputs(2, 70, 3))
    torch.library.opcheck(op, (log_a, b, h0, False, True, False, torch.bfloat16))
    torch.library.opcheck(op, (log_a.exp().detach().requires_grad_(), b, None, True, False, True, torch.bfloat16))
    h, _ = linear_scan(log_a.detach(), b.detach(), h0.detach(), log_space=True, out_dtype=torch.bfloat16)
    bwd = torch.ops.mmrec.linear_scan_backward.default
    torch.library.opcheck(bwd, (log_a.detach(), h, torch.randn_like(h), torch.randn_like(h0), h0.detach(), False, torch.float32, True, False))


def test_composite_takes_the_ops_defaults():
    """The benchmarks call the composite as they call the op: ``(a, b)`` alone."""
    from mmrec.ops.linear_scan import linear_scan_composite

    a, b = torch.rand(2, 37, 5, dtype=torch.float64), torch.randn(2, 37, 5, dtype=torch.float64)
    h, h_last = linear_scan_composite(a, b)
    assert rel_err(h, linear_scan_reference(a, b)[0]) < 1e-12
    assert torch.equal(h_last, h[:, -1])

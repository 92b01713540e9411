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
    torch.library.opcheck(torch.ops.mmrec.linear_scan.default, (a, b, h0, False))
    torch.library.opcheck(torch.ops.mmrec.linear_scan.default, (a, b, None, True))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same"):
        linear_scan(torch.rand(2, 5, 3), torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="h0"):
        linear_scan(torch.rand(2, 5, 3), torch.rand(2, 5, 3), torch.rand(2, 4))

"""The chunked gated delta rule against the token-by-token reference (mmrec.ops.delta_rule)."""

import pytest
import torch
import torch.nn.functional as F

from mmrec.ops.delta_rule import chunk_delta_rule, delta_rule_step, naive_delta_rule
from mmrec.ops.delta_rule.chunk_prepare import unit_lower_inverse
from tests.helpers import rel_err


def inputs(batch=2, length=37, heads=3, key_dim=5, value_dim=7, dtype=torch.float64, log_alpha=(-1.0, 0.0),
           h0=True):
    """Random inputs with unit-norm keys (as the layer gives them) and β in (0, 1)."""
    q = torch.randn(batch, length, heads, key_dim, dtype=dtype)
    k = F.normalize(torch.randn(batch, length, heads, key_dim, dtype=dtype), dim=-1)
    v = torch.randn(batch, length, heads, value_dim, dtype=dtype)
    beta = torch.rand(batch, length, heads, dtype=dtype)
    log_a = torch.empty(batch, length, heads, dtype=dtype).uniform_(*log_alpha)
    state = torch.randn(batch, heads, key_dim, value_dim, dtype=dtype) if h0 else None
    return q, k, v, beta, log_a, state


def literal_loop(q, k, v, beta, log_alpha, state):
    """The defining formula with the identity matrix written out, one head at a time."""
    batch, length, heads, key_dim = k.shape
    out = torch.zeros(*v.shape, dtype=torch.float64)
    state = state.clone() if state is not None else torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float64)
    eye = torch.eye(key_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            s = state[b, h]
            for t in range(length):
                kt, bt, at = k[b, t, h], beta[b, t, h], log_alpha[b, t, h].exp()
                s = at * (eye - bt * torch.outer(kt, kt)) @ s + bt * torch.outer(kt, v[b, t, h])
                out[b, t, h] = s.T @ q[b, t, h]
            state[b, h] = s
    return out, state


def test_reference_is_the_defining_formula():
    args = inputs(length=9)
    o, state = naive_delta_rule(*args)
    want_o, want_state = literal_loop(*args)
    assert rel_err(o, want_o) < 1e-13 and rel_err(state, want_state) < 1e-13


@pytest.mark.parametrize("length,chunk", [(37, 16), (1, 64), (5, 64), (48, 16), (65, 64), (37, 1)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_equals_reference_float64_with_gradients(length, chunk, with_h0):
    args = inputs(length=length, h0=with_h0)
    mine = [a.clone().requires_grad_() if a is not None else None for a in args]
    ref = [a.clone().requires_grad_() if a is not None else None for a in args]
    o, state = chunk_delta_rule(*mine, chunk_size=chunk)
    want_o, want_state = naive_delta_rule(*ref)
    assert o.dtype == state.dtype == torch.float64
    assert rel_err(o, want_o) < 1e-12 and rel_err(state, want_state) < 1e-12
    probe_o, probe_s = torch.randn_like(o), torch.randn_like(state)
    ((o * probe_o).sum() + (state * probe_s).sum()).backward()
    ((want_o * probe_o).sum() + (want_state * probe_s).sum()).backward()
    for name, got, want in zip(("q", "k", "v", "beta", "log_alpha", "h0"), mine, ref):
        if got is not None:  # (log α's gradient is exactly 0 for one token from a zero state)
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_gradcheck_tiny():
    args = [a.requires_grad_() for a in inputs(batch=1, length=7, heads=2, key_dim=3, value_dim=2)]
    assert torch.autograd.gradcheck(lambda *a: chunk_delta_rule(*a, chunk_size=3), args)


@pytest.mark.parametrize("log_alpha", [(-40.0, -20.0), (-1e-7, 0.0)], ids=["decay-near-0", "decay-near-1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_decays_stay_finite_and_exact(log_alpha, dtype):
    # near 0: e^Λ underflows to 0 within a chunk; the masked exponents must not give inf·0
    args = inputs(length=150, log_alpha=log_alpha, dtype=dtype)
    mine = [a.clone().requires_grad_() for a in args]
    o, state = chunk_delta_rule(*mine, chunk_size=64)
    (o.square().sum() + state.square().sum()).backward()
    assert all(torch.isfinite(a.grad).all() for a in mine)
    want_o, want_state = naive_delta_rule(*[a.double() for a in args])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(o, want_o) < tol and rel_err(state, want_state) < tol


def test_repeated_key_overwrites_its_value():
    """What the delta rule is for: with β = 1 and no decay, writing (k, v1) then (k, v2)
    leaves the state returning v2 for k, not v1 + v2."""
    k = F.normalize(torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1).expand(1, 2, 1, 4)
    v = torch.randn(1, 2, 1, 3, dtype=torch.float64)
    ones, zeros = torch.ones(1, 2, 1, dtype=torch.float64), torch.zeros(1, 2, 1, dtype=torch.float64)
    o, _ = chunk_delta_rule(k, k, v, ones, zeros)
    assert rel_err(o[:, 1], v[:, 1]) < 1e-12


def test_bfloat16_inputs_accumulate_in_float32():
    args = inputs(length=200, heads=2, key_dim=16, value_dim=16, log_alpha=(-0.05, 0.0))
    low = [a.bfloat16() for a in args[:5]] + [args[5].float()]
    o, state = chunk_delta_rule(*low, chunk_size=64)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    want_o, want_state = naive_delta_rule(*[a.double() for a in low])  # the same rounded inputs
    assert rel_err(o, want_o) < 1e-2  # bf16 rounding of the output itself
    assert rel_err(state, want_state) < 1e-4


@pytest.mark.parametrize("split", [1, 13, 36])
def test_pieces_carried_through_the_state_equal_one_pass(split):
    q, k, v, beta, log_a, h0 = inputs(length=37)
    whole, end = chunk_delta_rule(q, k, v, beta, log_a, h0, chunk_size=8)
    first, mid = chunk_delta_rule(q[:, :split], k[:, :split], v[:, :split], beta[:, :split], log_a[:, :split], h0, chunk_size=8)
    second, last = chunk_delta_rule(q[:, split:], k[:, split:], v[:, split:], beta[:, split:], log_a[:, split:], mid, chunk_size=8)
    assert rel_err(torch.cat([first, second], 1), whole) < 1e-12 and rel_err(last, end) < 1e-12


def test_step_equals_one_token_of_the_chunked_form():
    q, k, v, beta, log_a, h0 = inputs(length=1)
    o, state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], log_a[:, 0], h0, scale=0.5)
    want_o, want_state = chunk_delta_rule(q, k, v, beta, log_a, h0, scale=0.5)
    assert rel_err(o, want_o[:, 0]) < 1e-13 and rel_err(state, want_state) < 1e-13


@pytest.mark.slow
def test_compiles_fullgraph_with_gradients():
    args = [a.float() for a in inputs(length=21, heads=2, key_dim=4, value_dim=3)]
    compiled = torch.compile(chunk_delta_rule, fullgraph=True)
    mine = [a.clone().requires_grad_() for a in args]
    ref = [a.clone().requires_grad_() for a in args]
    o, state = compiled(*mine, chunk_size=8)
    want_o, want_state = chunk_delta_rule(*ref, chunk_size=8)
    assert rel_err(o, want_o) < 1e-5 and rel_err(state, want_state) < 1e-5
    (o.sum() + state.square().sum()).backward()
    (want_o.sum() + want_state.square().sum()).backward()
    for got, want in zip(mine, ref):
        assert rel_err(got.grad, want.grad) < 1e-4


def test_autocast_does_not_lower_the_precision():
    """Under bf16 autocast (how training runs on a GPU) the products stay float32."""
    args = [a.float() for a in inputs(length=40, heads=2, key_dim=8, value_dim=8)]
    plain, plain_state = chunk_delta_rule(*args, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_state = chunk_delta_rule(*args, chunk_size=16)
        step, step_state = delta_rule_step(*[a[:, 0] for a in args[:5]], args[5])
    want_step, want_step_state = naive_delta_rule(*[a[:, :1] for a in args[:5]], args[5])
    assert cast.dtype == cast_state.dtype == torch.float32
    assert rel_err(cast, plain) < 1e-6 and rel_err(cast_state, plain_state) < 1e-6
    assert rel_err(step, want_step[:, 0]) < 1e-6 and rel_err(step_state, want_step_state) < 1e-6


def test_unit_lower_inverse_and_its_gradient_float64():
    """The inverse of ``I + tril(A, −1)`` on a matrix whose other entries are not read, and
    its solve-free backward, against a dense inverse (odd size, batched)."""
    torch.manual_seed(0)
    a = torch.randn(2, 3, 13, 13, dtype=torch.float64, requires_grad=True)
    inverse = unit_lower_inverse(a)
    dense = torch.linalg.inv(torch.eye(13, dtype=torch.float64) + a.tril(-1))
    torch.testing.assert_close(inverse, dense)
    grad = torch.randn_like(inverse)
    (ours,) = torch.autograd.grad(inverse, a, grad)
    (theirs,) = torch.autograd.grad(dense, a, grad)
    torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(unit_lower_inverse, (a[:1, :1, :6, :6].detach().requires_grad_(),))


def test_unit_lower_inverse_backward_ignores_autocast():
    """Its products stay float32 when the backward runs under bf16 autocast."""
    torch.manual_seed(0)
    a = (0.3 * torch.randn(2, 64, 64)).requires_grad_()
    grad = torch.randn(2, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ours,) = torch.autograd.grad(unit_lower_inverse(a), a, grad)
    a64 = a.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(unit_lower_inverse(a64), a64, grad.double())
    assert ours.dtype == torch.float32
    assert rel_err(ours.double(), want) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_document_resets_cut_the_state(device, dtype):
    """The delta layer's document reset (log α = RESET_LOG_DECAY, several in one chunk, one
    on a chunk's first token): each document's output is that of the document alone from a
    zero state, and every gradient is finite (on CUDA: the Triton kernels)."""
    from mmrec.layers.delta_recurrence import RESET_LOG_DECAY

    if dtype == torch.float64 and device == "cuda":
        pytest.skip("the kernels take 16- and 32-bit inputs; float64 runs the PyTorch form")
    torch.manual_seed(0)
    q, k, v, beta, log_a, state = inputs(length=150, key_dim=16, value_dim=16, log_alpha=(-0.1, 0.0), dtype=dtype)
    starts = [0, 20, 23, 25, 64, 100]  # three documents start inside one 64-token chunk, one at a chunk border
    log_a[:, starts[1:]] = RESET_LOG_DECAY
    args = [x.to(device).requires_grad_() for x in (q, k, v, beta, log_a, state)]
    o, _ = chunk_delta_rule(*args, chunk_size=64)
    o.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in args)
    tol = 1e-12 if dtype == torch.float64 else 2e-4
    for start, stop in zip(starts[1:], [*starts[2:], 150]):
        alone, _ = naive_delta_rule(*(x[:, start:stop].double() for x in (q, k, v, beta, log_a)), None)
        assert rel_err(o[:, start:stop].cpu(), alone) < tol, (start, stop)

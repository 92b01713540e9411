"""``mmrec::delta_chunk_scan`` (the chunk loop of the delta rule) against float64 references.

The op's CPU implementation and backward are checked against autograd through the plain
loop (``delta_chunk_scan_reference``) and, through ``chunk_delta_rule``, against the
token-by-token ``naive_delta_rule``. The Triton kernels run under Triton's interpreter
without a GPU (``TRITON_INTERPRET=1``, which must be set before Triton is imported, so
those checks run in a child process that executes this file); on CUDA they run compiled.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mmrec.ops.delta_rule import chunk_delta_rule, naive_delta_rule
from mmrec.ops.delta_rule.chunk import _chunk_delta_rule
from mmrec.ops.delta_rule.chunk_scan import delta_chunk_scan, delta_chunk_scan_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON
NAMES = ("w1", "w2", "q_decayed", "k_decayed", "attn", "chunk_decay", "initial_state")
loop_delta_rule = functools.partial(_chunk_delta_rule, scan=delta_chunk_scan_reference)


def err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 on CPU; every value must be finite."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values (unwritten output?)"
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def scan_inputs(batch=3, heads=2, chunks=3, size=5, key_dim=24, value_dim=40, dtype=torch.float64, device="cpu",
                generator=None):
    """Random op inputs at the scale the chunked form gives them (O(1) entries, decays in (0.3, 1))."""
    kw = {"dtype": torch.float64, "generator": generator}
    shape = (batch, heads, chunks, size)
    w1 = torch.randn(*shape, value_dim, **kw)
    w2, q_decayed, k_decayed = (torch.randn(*shape, key_dim, **kw) / key_dim**0.5 for _ in range(3))
    attn = torch.randn(*shape, size, **kw).tril() / size**0.5
    chunk_decay = 0.3 + 0.7 * torch.rand(batch, heads, chunks, **kw)
    state = torch.randn(batch, heads, key_dim, value_dim, **kw)
    return [x.to(dtype).to(device) for x in (w1, w2, q_decayed, k_decayed, attn, chunk_decay, state)]


def delta_inputs(batch=3, length=37, heads=2, key_dim=24, value_dim=40, dtype=torch.float64, h0=True, generator=None):
    """Inputs of the delta rule: unit-norm keys, β in (0, 1), log α in (-1, 0)."""
    kw = {"dtype": torch.float64, "generator": generator}
    q = torch.randn(batch, length, heads, key_dim, **kw)
    k = F.normalize(torch.randn(batch, length, heads, key_dim, **kw), dim=-1)
    v = torch.randn(batch, length, heads, value_dim, **kw)
    beta = torch.rand(batch, length, heads, **kw)
    log_alpha = -torch.rand(batch, length, heads, **kw)
    state = torch.randn(batch, heads, key_dim, value_dim, **kw) if h0 else None
    return [None if x is None else x.to(dtype) for x in (q, k, v, beta, log_alpha)] + [
        None if state is None else state.float() if dtype != torch.float64 else state]


def reference_grads(inputs, grad_o, grad_final):
    """Outputs and input gradients of autograd through the plain loop, in float64."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in inputs]
    o, final = delta_chunk_scan_reference(*leaves)
    loss = 0.0
    if grad_o is not None:
        loss = loss + (o * grad_o.cpu().double()).sum()
    if grad_final is not None:
        loss = loss + (final * grad_final.cpu().double()).sum()
    return (o.detach(), final.detach()), torch.autograd.grad(loss, leaves, materialize_grads=True)


# ------------------------------------------------------------------ the op on CPU


@pytest.mark.parametrize("outputs", ["both", "o", "final"])
@pytest.mark.parametrize("chunks", [1, 4])
def test_op_matches_loop_float64_with_gradients(outputs, chunks):
    inputs = scan_inputs(chunks=chunks)
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, final, states = delta_chunk_scan(*leaves)
    assert not states.requires_grad
    grad_o = torch.randn_like(o) if outputs != "final" else None
    grad_final = torch.randn_like(final) if outputs != "o" else None
    (ref_o, ref_final), refs = reference_grads(inputs, grad_o, grad_final)
    assert o.dtype == final.dtype == torch.float64
    assert err(o, ref_o) < 1e-13 and err(final, ref_final) < 1e-13
    assert err(states[:, :, 0], inputs[-1]) == 0
    pairs = [(out, g) for out, g in ((o, grad_o), (final, grad_final)) if g is not None]
    grads = torch.autograd.grad([out for out, _ in pairs], leaves, [g for _, g in pairs])
    for name, got, want in zip(NAMES, grads, refs):
        assert err(got, want) < 1e-12, name


def test_gradcheck_and_gradgradcheck():
    inputs = [x.requires_grad_() for x in scan_inputs(batch=1, heads=2, chunks=3, size=2, key_dim=3, value_dim=2)]
    fn = lambda *a: delta_chunk_scan(*a)[:2]  # the states are not differentiable
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_opcheck():
    inputs = scan_inputs(batch=2, chunks=3, size=4, key_dim=5, value_dim=3)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan.default, tuple(x.requires_grad_() for x in inputs))
    detached = [x.detach() for x in inputs]
    o, final, states = delta_chunk_scan(*detached)
    args = (*detached[:6], states, torch.randn_like(o), torch.randn_like(final))
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, args)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, args[:7] + (None, args[8]))
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, args[:8] + (None,))


@pytest.mark.parametrize("length,chunk", [(37, 16), (50, 64), (48, 16), (9, 4)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_delta_rule_op_equals_loop_and_naive_float64(length, chunk, with_h0):
    """``chunk_delta_rule`` (the op) against the same chunked form with the autograd loop and
    against the token-by-token reference: outputs and every input's gradient."""
    gen = torch.Generator().manual_seed(length * 2 + with_h0)
    inputs = delta_inputs(length=length, h0=with_h0, generator=gen)
    batch, _, heads, key_dim = inputs[1].shape
    probe_o = torch.randn(*inputs[2].shape, generator=gen, dtype=torch.float64)
    probe_state = torch.randn(batch, heads, key_dim, inputs[2].shape[-1], generator=gen, dtype=torch.float64)
    runs = {"op": lambda *a: chunk_delta_rule(*a, chunk_size=chunk, scale=0.7),
            "loop": lambda *a: loop_delta_rule(*a, chunk, 0.7),
            "naive": lambda *a: naive_delta_rule(*a, scale=0.7)}
    results = {}
    for name, fn in runs.items():
        leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
        o, state = fn(*leaves)
        grads = torch.autograd.grad((o * probe_o).sum() + (state * probe_state).sum(), [x for x in leaves if x is not None])
        results[name] = (o, state, grads)
    for other in ("loop", "naive"):
        o, state, grads = results["op"]
        want_o, want_state, want_grads = results[other]
        assert err(o, want_o) < 1e-12 and err(state, want_state) < 1e-12, other
        for name, got, want in zip(("q", "k", "v", "beta", "log_alpha", "h0"), grads, want_grads):
            assert err(got, want) < 1e-10, (other, name)


def test_delta_rule_runs_the_op():
    inputs = delta_inputs(length=20)
    _, state = chunk_delta_rule(*[x.requires_grad_() for x in inputs], chunk_size=8)
    assert "mmrec_delta_chunk_scan" in state.grad_fn.name()


def test_bad_inputs_are_refused():
    inputs = scan_inputs(batch=2, chunks=2, size=3, key_dim=4, value_dim=5)
    with pytest.raises(ValueError, match="attn"):
        delta_chunk_scan(*inputs[:4], inputs[4][..., :2], *inputs[5:])
    with pytest.raises(ValueError, match="initial_state"):
        delta_chunk_scan(*inputs[:6], inputs[6][..., :4])
    with pytest.raises(ValueError, match="dtype"):
        delta_chunk_scan(*inputs[:6], inputs[6].float())
    with pytest.raises(ValueError, match="float32 or float64"):
        delta_chunk_scan(*[x.bfloat16() for x in inputs])


@pytest.mark.slow
def test_op_compiles_fullgraph_with_gradients():
    inputs = [x.float() for x in scan_inputs(chunks=3, size=4, key_dim=6, value_dim=5)]
    compiled = torch.compile(lambda *a: delta_chunk_scan(*a)[:2], fullgraph=True)
    mine = [x.clone().requires_grad_() for x in inputs]
    o, final = compiled(*mine)
    grad_o, grad_final = torch.randn_like(o), torch.randn_like(final)
    (ref_o, ref_final), refs = reference_grads(inputs, grad_o, grad_final)
    assert err(o, ref_o) < 1e-5 and err(final, ref_final) < 1e-5
    grads = torch.autograd.grad([o, final], mine, [grad_o, grad_final])
    for name, got, want in zip(NAMES, grads, refs):
        assert err(got, want) < 1e-5, name

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
from mmrec.ops.delta_rule.chunk_prepare import chunk_prepare_reference
from mmrec.ops.delta_rule.chunk_scan import (
    _chunk_gradients,
    delta_chunk_scan,
    delta_chunk_scan_reference,
)
from tests.helpers import checked_rel_err as err
from tests.helpers import ops_called, run_under_triton_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON
NAMES = ("w1", "w2", "q_decayed", "k_decayed", "attn", "chunk_decay", "initial_state")
loop_delta_rule = functools.partial(_chunk_delta_rule, prepare=chunk_prepare_reference, scan=delta_chunk_scan_reference)


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


def test_states_kept_only_for_a_backward():
    inputs = scan_inputs(chunks=3)
    with torch.no_grad():
        o, final, states = delta_chunk_scan(*[x.requires_grad_() for x in inputs])
    assert states.shape == (3, 2, 0, 24, 40)
    want_o, want_final, want_states = delta_chunk_scan(*[x.detach() for x in inputs[:6]], inputs[6].detach().requires_grad_())
    assert want_states.shape == (3, 2, 3, 24, 40)
    assert torch.equal(o, want_o) and torch.equal(final, want_final)
    o, final, _ = torch.ops.mmrec.delta_chunk_scan(*inputs, False)  # not through the wrapper
    with pytest.raises(RuntimeError, match="keep_states"):
        (o.sum() + final.sum()).backward()


def test_gradcheck_and_gradgradcheck():
    inputs = [x.requires_grad_() for x in scan_inputs(batch=1, heads=2, chunks=3, size=2, key_dim=3, value_dim=2)]
    fn = lambda *a: delta_chunk_scan(*a)[:2]  # the states are not differentiable
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_opcheck():
    inputs = scan_inputs(batch=2, chunks=3, size=4, key_dim=5, value_dim=3)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan.default, tuple(x.requires_grad_() for x in inputs))
    # any strides in (a column-major state among them), contiguous outputs as the fake kernel says
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan.default, tuple(strided([x.detach() for x in inputs])))
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan.default, (*[x.detach() for x in inputs], False))
    detached = [x.detach() for x in inputs]
    o, final, _ = delta_chunk_scan(*detached)
    args = (*detached[1:6], torch.randn_like(o), torch.randn_like(final))
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, args)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, args[:5] + (None, args[6]))
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, args[:6] + (None,))
    column_major = args[6].transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, (*strided(detached)[1:6], args[5], column_major))


@pytest.mark.parametrize("length,chunk,with_h0", [(37, 16, True), (37, 16, False), (50, 64, True), (9, 4, True)])
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
    called = ops_called(lambda: chunk_delta_rule(*[x.requires_grad_() for x in inputs], chunk_size=8)[1].sum().backward())
    assert called == ["mmrec::delta_chunk_prepare", "mmrec::delta_chunk_scan", "mmrec::delta_chunk_scan_backward",
                      "mmrec::delta_chunk_prepare_backward"]


def test_bad_inputs_are_refused():
    inputs = scan_inputs(batch=2, chunks=2, size=3, key_dim=4, value_dim=5)
    with pytest.raises(ValueError, match="attn"):
        delta_chunk_scan(*inputs[:4], inputs[4][..., :2], *inputs[5:])
    with pytest.raises(ValueError, match="initial_state"):
        delta_chunk_scan(*inputs[:6], inputs[6][..., :4])
    with pytest.raises(ValueError, match="dtype"):
        delta_chunk_scan(*inputs[:6], inputs[6].float())
    with pytest.raises(ValueError, match="accumulation dtype"):  # bf16 matrices, but a bf16 state too
        delta_chunk_scan(*[x.bfloat16() for x in inputs])
    with pytest.raises(ValueError, match="float32, float64 or bfloat16"):
        delta_chunk_scan(*[x.int() for x in inputs])


def bf16_matrices(inputs):
    """The op's inputs with the chunk's five matrices stored in bf16, the decays and state in float32."""
    return [x.bfloat16() for x in inputs[:5]] + [x.float() for x in inputs[5:]]


def test_op_with_bf16_matrices_against_float64():
    """The chunk's matrices in bf16 (``chunk_delta_rule(intermediates=torch.bfloat16)``): ``O``,
    the states and the gradients of the matrices in bf16, the final state and the decays'
    and initial state's gradients in float32, each near the float64 loop on the same values;
    the products round the state as the kernel's bf16 products do, so even the float32
    final state is off by bf16's rounding, not float32's."""
    inputs = bf16_matrices(scan_inputs(chunks=4, size=8))
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, final, states = delta_chunk_scan(*leaves)
    assert (o.dtype, final.dtype, states.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    grad_o, grad_final = torch.randn_like(o), torch.randn_like(final)
    (ref_o, ref_final), refs = reference_grads(inputs, grad_o, grad_final)
    assert err(o, ref_o) < 1e-2 and 1e-4 < err(final, ref_final) < 1e-2
    grads = torch.autograd.grad([o, final], leaves, [grad_o, grad_final])
    for name, got, want in zip(NAMES, grads, refs):
        assert err(got, want) < 2e-2, name
    # the backward's own dtypes (autograd would cast a wrong one back silently)
    grad_u, grad_next, grad_initial = torch.ops.mmrec.delta_chunk_scan_backward(*inputs[1:6], grad_o, grad_final)
    direct = (*_chunk_gradients(*inputs[:3], inputs[4], states, grad_o, grad_u, grad_next), grad_initial)
    assert [g.dtype for g in direct] == [x.dtype for x in inputs]
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan.default, tuple(leaves))
    args = (*inputs[1:6], grad_o, grad_final)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, args)


@pytest.mark.parametrize("with_h0", [True, False])
def test_delta_rule_with_bf16_intermediates_near_naive_float64(with_h0):
    gen = torch.Generator().manual_seed(3)
    inputs = delta_inputs(length=45, h0=with_h0, generator=gen)
    probe_o = torch.randn(*inputs[2].shape, generator=gen, dtype=torch.float64)
    want_leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    want_o, want_state = naive_delta_rule(*want_leaves, scale=0.7)
    want = torch.autograd.grad((want_o * probe_o).sum() + want_state.sum(), [x for x in want_leaves if x is not None])
    leaves = [None if x is None else x.float().requires_grad_() for x in inputs]
    o, state = chunk_delta_rule(*leaves, chunk_size=16, scale=0.7, intermediates=torch.bfloat16)
    assert o.dtype == state.dtype == torch.float32
    assert err(o, want_o) < 2e-2 and err(state, want_state) < 2e-2
    got = torch.autograd.grad((o * probe_o.float()).sum() + state.sum(), [x for x in leaves if x is not None])
    for name, g, w in zip(("q", "k", "v", "beta", "log_alpha", "h0"), got, want):
        assert err(g, w) < 3e-2, name


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


# -------------------------------------------------- Triton kernels under the interpreter


def strided(inputs):
    """The same values in the layouts ``chunk.py`` hands over and worse: ``w1`` and ``w2``
    split from one tensor, ``q_decayed`` and ``attn`` transposed in memory, ``chunk_decay``
    every other element, the state column-major."""
    w1, w2, q_decayed, k_decayed, attn, chunk_decay, state = inputs
    w1, w2 = torch.cat([w1, w2], -1).split([w1.shape[-1], w2.shape[-1]], -1)
    q_decayed = q_decayed.transpose(-1, -2).contiguous().transpose(-1, -2)
    attn = attn.transpose(1, 3).contiguous().transpose(1, 3)
    chunk_decay = torch.stack([chunk_decay, chunk_decay], -1)[..., 0]
    state = state.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = [w1, w2, q_decayed, k_decayed, attn, chunk_decay, state]
    assert not any(x.is_contiguous() for x in out if x is not k_decayed)
    return out


def kernel_grads(kernels, inputs, states, grad_o, grad_final, config=None):
    """Every input's gradient from the adjoint kernel (into NaN-filled outputs, so an
    unwritten element shows) and the batched products."""
    w1, w2, q_decayed, k_decayed, attn, chunk_decay, initial_state = inputs
    nan = float("nan")
    full = lambda x: torch.full(x.shape, nan, dtype=x.dtype, device=x.device)  # noqa: E731 (contiguous)
    adjoints = (full(w1), full(states), full(initial_state))
    kernels.chunk_scan_adjoint(w2, q_decayed, k_decayed, attn, chunk_decay, grad_o, grad_final, out=adjoints, config=config)
    grad_u, grad_next, grad_initial = adjoints
    return (*_chunk_gradients(w1, w2, q_decayed, attn, states, grad_o, grad_u, grad_next), grad_initial)


def _interpreter_checks() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (set before Triton is imported)."""
    from mmrec.ops.delta_rule import chunk_scan_triton as kernels

    gen = torch.Generator().manual_seed(0)
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    cases = [  # dtype (bf16: the chunk's matrices stored in bf16, the state float32), B, H, N, C, K, V, grad_o,
        # grad_final, layout, launch config, tolerance
        # odd sizes, padded on chip: C=5 -> 16 rows, K=24 -> 32; V=40 in three 16-column blocks
        (f32, 2, 2, 3, 5, 24, 40, True, True, "contiguous", {"BLOCK_V": 16}, 1e-5),
        (f64, 2, 2, 3, 5, 24, 40, True, True, "contiguous", {"BLOCK_V": 16}, 1e-12),
        (f64, 1, 3, 2, 16, 16, 16, True, False, "strided", {}, 1e-12),
        (f64, 2, 1, 3, 7, 5, 20, False, True, "strided", {"BLOCK_V": 16, "STAGES": 2}, 1e-12),
        (f32, 3, 1, 2, 20, 24, 40, True, True, "contiguous", {"BLOCK_V": 64, "STAGES": 2}, 1e-5),  # one block
        # fp32 operands as two bf16 parts each, three products: about 16 bits of mantissa
        (f32, 2, 2, 3, 20, 24, 40, True, True, "strided", {"PRECISION": "bf16x3"}, 5e-4),
        # one product of bf16-rounded operands (8 bits of mantissa)
        (f32, 2, 2, 3, 20, 24, 40, True, True, "contiguous", {"PRECISION": "bf16"}, 3e-2),
        # the outputs after the loop, by a kernel parallel over chunks
        (f64, 2, 2, 3, 5, 24, 40, True, True, "strided", {"OUTPUT": "after", "BLOCK_V": 16}, 1e-12),
        # stored in bf16: every product a bf16 product (the state and adjoint rounded for it)
        (bf16, 2, 2, 3, 20, 24, 40, True, True, "strided", {"BLOCK_V": 16}, 3e-2),
        (bf16, 2, 2, 3, 20, 24, 40, True, False, "contiguous", {"OUTPUT": "after"}, 3e-2),
        (bf16, 1, 2, 3, 20, 24, 40, True, True, "contiguous", {"PRECISION": "bf16"}, 3e-2),  # no fp32 product left
    ]
    for dtype, batch, heads, chunks, size, key_dim, value_dim, with_go, with_gf, layout, config, tol in cases:
        acc = f32 if dtype == bf16 else dtype
        inputs = scan_inputs(batch, heads, chunks, size, key_dim, value_dim, dtype=acc, generator=gen)
        inputs = [x.to(dtype) for x in inputs[:5]] + inputs[5:]
        if layout == "strided":
            inputs = strided(inputs)
        nan = float("nan")
        out = (torch.full(inputs[0].shape, nan, dtype=dtype), torch.full(inputs[6].shape, nan, dtype=acc),
               torch.full((batch, heads, chunks, key_dim, value_dim), nan, dtype=dtype))
        o, final, states = kernels.chunk_scan_forward(*inputs, out=out, config=config)
        grad_o = torch.randn(o.shape, generator=gen, dtype=dtype) if with_go else None
        if layout == "strided" and with_go:  # dO as autograd hands it over from a view: read in place
            grad_o = grad_o.transpose(1, 3).contiguous().transpose(1, 3)
        grad_final = torch.randn(final.shape, generator=gen, dtype=acc) if with_gf else None
        (ref_o, ref_final), refs = reference_grads(inputs, grad_o, grad_final)
        ref_states = torch.stack([inputs[6]] + [delta_chunk_scan_reference(*[x[:, :, :n] for x in inputs[:6]], inputs[6])[1]
                                                for n in range(1, chunks)], 2)
        errs = {"o": err(o, ref_o), "final": err(final, ref_final), "states": err(states, ref_states)}
        grads = kernel_grads(kernels, inputs, states, grad_o, grad_final, config)
        for name, arg, got, want in zip(NAMES, inputs, grads, refs):
            assert got.dtype == arg.dtype and got.shape == arg.shape, name
            errs["d" + name] = err(got, want)
        bad = {k: v for k, v in errs.items() if not v < tol}
        label = f"{dtype} B={batch} H={heads} N={chunks} C={size} K={key_dim} V={value_dim} dO={with_go} dS={with_gf} {layout} {config}"
        assert not bad, f"{label}: {bad}"
        print(f"ok {label}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    _delta_rule_layouts_check(kernels)


def _delta_rule_layouts_check(kernels) -> None:
    """The kernels on exactly what ``chunk_delta_rule`` passes the op (a length that ends
    mid-chunk), against the token-by-token reference, float64."""
    captured = []

    def scan(*args):
        captured.append(args)
        return kernels.chunk_scan_forward(*args)

    inputs = delta_inputs(batch=2, length=21, heads=2, key_dim=24, value_dim=40, generator=torch.Generator().manual_seed(1))
    o, state = _chunk_delta_rule(*inputs, 8, 0.7, scan=scan)
    want_o, want_state = naive_delta_rule(*inputs, scale=0.7)
    args = captured[0]
    grad_o, grad_final = torch.randn_like(args[0]), torch.randn_like(args[6])
    _, refs = reference_grads(args, grad_o, grad_final)
    _, _, states = kernels.chunk_scan_forward(*args)
    grads = kernel_grads(kernels, args, states, grad_o, grad_final)
    errs = {"o": err(o, want_o), "final": err(state, want_state)}
    errs.update({"d" + name: err(got, want) for name, got, want in zip(NAMES, grads, refs)})
    in_loop = kernels.chunk_scan_forward(*args)[0]
    for config in ({}, {"OUTPUT": "after"}):
        inference = kernels.chunk_scan_forward(*args, keep_states=False, config=config)  # no states written
        training = kernels.chunk_scan_forward(*args, config=config)
        assert inference[2].shape[2] == 0 and torch.equal(inference[0], training[0]) and torch.equal(inference[1], training[1])
        assert err(training[0], in_loop) < 1e-12, config
    bad = {k: v for k, v in errs.items() if not v < 1e-12}
    assert not bad, f"chunk_delta_rule layouts: {bad}"
    print("ok chunk_delta_rule layouts: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_triton_interpreter():
    out = run_under_triton_interpreter(__file__)
    assert out.count("ok ") == 12, out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_launchers_refuse_outputs_they_cannot_write():
    from mmrec.ops.delta_rule import chunk_scan_triton as kernels

    inputs = scan_inputs(1, 2, 2, 16, 16, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    column_major = inputs[6].transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.chunk_scan_forward(*inputs, out=(torch.empty_like(inputs[0]), column_major, torch.empty(1, 2, 2, 16, 16)))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.chunk_scan_adjoint(*inputs[1:6], torch.ones_like(inputs[0]), None,
                                   out=(torch.empty_like(inputs[0]), torch.empty(1, 2, 2, 16, 16), column_major))
    many = scan_inputs(65536, 1, 1, 1, 1, 1, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="65535"):  # more than CUDA's grid takes
        kernels.chunk_scan_forward(*many)
    with pytest.raises(ValueError, match="shapes"):  # no chunk states where a backward needs them
        kernels.chunk_scan_forward(*inputs, out=(torch.empty_like(inputs[0]), torch.empty_like(inputs[6]),
                                                 torch.empty(1, 2, 0, 16, 16)))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_launch_config_choice():
    from mmrec.ops.delta_rule.chunk_scan_triton import pick_config

    cfg = pick_config(64, 128, 128)
    assert (cfg["BLOCK_C"], cfg["BLOCK_K"], cfg["PRECISION"]) == (64, 128, "tf32x3")  # PyTorch's "highest"
    torch.set_float32_matmul_precision("high")
    try:
        assert pick_config(64, 128, 128)["PRECISION"] == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert pick_config(5, 24, 40)["BLOCK_C"] == 16 and pick_config(5, 24, 40)["BLOCK_K"] == 32  # padded to tl.dot's 16
    assert pick_config(64, 64, 64, interpret=True)["PRECISION"] == "ieee"
    assert pick_config(64, 64, 64)["BLOCK_V"] == 32 and pick_config(64, 64, 64, config={"BLOCK_V": 64})["BLOCK_V"] == 64
    with pytest.raises(ValueError, match="power of two"):
        pick_config(64, 64, 64, config={"BLOCK_V": 24})
    with pytest.raises(ValueError, match="cover"):
        pick_config(64, 64, 64, config={"BLOCK_C": 32})
    assert pick_config(64, 64, 64)["OUTPUT"] == "loop"
    with pytest.raises(ValueError, match="OUTPUT"):
        pick_config(64, 64, 64, config={"OUTPUT": "later"})


# ----------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype,intermediates,tol", [(torch.float32, None, 1e-4), (torch.bfloat16, None, 1e-2),
                                                     (torch.bfloat16, torch.bfloat16, 3e-2)], ids=str)
def test_cuda_delta_rule_matches_float64_loop(head_dim, dtype, intermediates, tol):
    """``chunk_delta_rule`` on CUDA (the Triton kernels) at a training size, outputs and
    every input's gradient, against the PyTorch loop in float64 on the same (rounded)
    inputs. Slow decays (log α in (-0.05, 0)) carry the state across many chunks."""
    gen = torch.Generator().manual_seed(head_dim)
    batch, length, heads = 2, 2048, 8
    inputs = delta_inputs(batch, length, heads, head_dim, head_dim, dtype=dtype, generator=gen)
    inputs[4] = inputs[4] * 0.05
    inputs = [x.cuda() for x in inputs]
    probe_o = torch.randn(batch, length, heads, head_dim, generator=gen).cuda()
    probe_state = torch.randn(batch, heads, head_dim, head_dim, generator=gen).cuda()
    results = {}
    op = functools.partial(chunk_delta_rule, intermediates=intermediates)
    for name, fn, cast in (("op", op, lambda x: x), ("ref", loop_delta_rule, lambda x: x.double())):
        leaves = [cast(x).detach().requires_grad_() for x in inputs]
        o, state = fn(*leaves, 64, 1.0)
        loss = (o.double() * probe_o.double()).sum() + (state.double() * probe_state.double()).sum()
        results[name] = (o, state, torch.autograd.grad(loss, leaves))
    o, state, grads = results["op"]
    want_o, want_state, want_grads = results["ref"]
    assert o.dtype == dtype and state.dtype == torch.float32
    assert err(o, want_o) < tol and err(state, want_state) < tol
    for name, arg, got, want in zip(("q", "k", "v", "beta", "log_alpha", "h0"), inputs, grads, want_grads):
        assert got.dtype == arg.dtype, name
        assert err(got, want) < tol, name


@cuda_only
@pytest.mark.parametrize("config,tol", [
    ({}, 1e-5),
    ({"PRECISION": "ieee"}, 1e-5),
    # one tf32 product rounds its inputs to 10 bits (2^-11 ≈ 5e-4 relative), and the chunk
    # recurrence and its adjoint compound that over every chunk; a wrong kernel is off by O(1)
    ({"PRECISION": "tf32"}, 2e-2),
    ({"PRECISION": "bf16x3"}, 5e-4),
    ({"STAGES": 2}, 1e-5),
    ({"OUTPUT": "after"}, 1e-5),
    ({"OUTPUT": "after", "PRECISION": "bf16"}, 3e-2),
    ({"BLOCK_V": 16, "num_warps": 4}, 1e-5),
    ({"BLOCK_V": 64}, 1e-5),  # the default with programs enough to fill the device
    ({"BLOCK_V": 128, "num_warps": 8}, 1e-5),
], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 33, 64, 128, 128), (3, 2, 17, 20, 24, 40)], ids=["K=V=128", "odd"])
def test_cuda_kernel_configs_against_float64(config, tol, shape):
    """The launchers, compiled, fp32, poisoned outputs, against autograd through the loop in float64."""
    from mmrec.ops.delta_rule import chunk_scan_triton as kernels

    gen = torch.Generator().manual_seed(3)
    inputs = [x.cuda() for x in scan_inputs(*shape, dtype=torch.float32, generator=gen)]
    o, final, states = (torch.full_like(inputs[0], float("nan")), torch.full_like(inputs[6], float("nan")),
                        torch.full((*shape[:3], shape[4], shape[5]), float("nan"), device="cuda"))
    kernels.chunk_scan_forward(*inputs, out=(o, final, states), config=config)
    again = kernels.chunk_scan_forward(*inputs, config=config)
    assert all(torch.equal(a, b) for a, b in zip((o, final, states), again)), "two identical launches differ"
    grad_o, grad_final = torch.randn_like(o), torch.randn_like(final)
    (ref_o, ref_final), refs = reference_grads(inputs, grad_o, grad_final)
    assert err(o, ref_o) < tol and err(final, ref_final) < tol
    grads = kernel_grads(kernels, inputs, states, grad_o, grad_final, config)
    grads_again = kernel_grads(kernels, inputs, states, grad_o, grad_final, config)
    for name, got, second, want in zip(NAMES, grads, grads_again, refs):
        assert torch.equal(got, second), f"{name} differs between two identical launches"
        assert err(got, want) < tol, name


@cuda_only
@pytest.mark.parametrize("config", [{}, {"BLOCK_V": 64}, {"BLOCK_V": 64, "STAGES": 0}, {"BLOCK_V": 32, "STAGES": 2},
                                    {"OUTPUT": "after"}], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 33, 64, 128, 128), (3, 2, 17, 20, 24, 40)], ids=["K=V=128", "odd"])
def test_cuda_kernels_with_bf16_matrices_against_float64(config, shape):
    """The launchers on the chunk's matrices stored in bf16 (every product a bf16 product, the
    state float32), against the float64 loop on the same values, and repeatable."""
    from mmrec.ops.delta_rule import chunk_scan_triton as kernels

    gen = torch.Generator().manual_seed(6)
    inputs = [x.cuda() for x in bf16_matrices(scan_inputs(*shape, dtype=torch.float32, generator=gen))]
    o, final, states = kernels.chunk_scan_forward(*inputs, config=config)
    again = kernels.chunk_scan_forward(*inputs, config=config)
    assert all(torch.equal(a, b) for a, b in zip((o, final, states), again)), "two identical launches differ"
    assert (o.dtype, final.dtype, states.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    grad_o, grad_final = torch.randn_like(o), torch.randn_like(final)
    (ref_o, ref_final), refs = reference_grads(inputs, grad_o, grad_final)
    assert err(o, ref_o) < 3e-2 and err(final, ref_final) < 3e-2
    grads = kernel_grads(kernels, inputs, states, grad_o, grad_final, config)
    grads_again = kernel_grads(kernels, inputs, states, grad_o, grad_final, config)
    for name, arg, got, second, want in zip(NAMES, inputs, grads, grads_again, refs):
        assert got.dtype == arg.dtype, name
        assert torch.equal(got, second), f"{name} differs between two identical launches"
        assert err(got, want) < 3e-2, name


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_value_columns_per_program_widen_only_when_the_programs_fill_the_device():
    from mmrec.ops.delta_rule.chunk_scan_triton import pick_config

    def block_v(sequences, value_dim=128, key_dim=128, sm_count=132, precision="tf32"):
        config = {"PRECISION": precision}
        return pick_config(64, key_dim, value_dim, sequences=sequences, sm_count=sm_count, config=config)["BLOCK_V"]

    assert block_v(8 * 16) == 64 and block_v(4 * 16) == 32  # two 64-column programs a head: 256 and 128 for 132 SMs
    assert block_v(1 * 16) == 32  # batch 1: 32 programs of 64 would leave most SMs idle
    assert block_v(16 * 16, sm_count=0) == 32  # not a CUDA device
    assert block_v(1024, value_dim=40) == 32  # values narrower than 64 columns
    assert block_v(1024, key_dim=256) == 32  # wider keys: not measured, a [256, 64] state would spill
    assert block_v(1024, precision="tf32x3") == 32 and block_v(1024, precision="bf16") == 64
    def config_16_bit(sequences, value_dim=128, key_dim=128, **config):
        cfg = pick_config(64, key_dim, value_dim, sequences=sequences, sm_count=132, operands_16_bit=True, config=config)
        return cfg["BLOCK_V"], cfg["STAGES"]

    # bf16 matrices: always pipelined; 64 columns when they fill the device, whatever the precision
    assert config_16_bit(1024, PRECISION="tf32x3") == (64, 3) and config_16_bit(8 * 16) == (64, 3)
    assert config_16_bit(1 * 16) == (32, 3) and config_16_bit(4 * 16) == (32, 3)  # 32 and 128 programs of 64
    assert config_16_bit(1024, value_dim=40) == (32, 3) and config_16_bit(1024, key_dim=256) == (32, 2)
    assert config_16_bit(1024, STAGES=4) == (64, 4) and config_16_bit(16, BLOCK_V=64) == (64, 3)
    warps = {b: pick_config(64, 128, 128, sequences=b * 16, sm_count=132, operands_16_bit=True)["num_warps"] for b in (1, 16)}
    assert warps == {1: 4, 16: 8}  # 32 columns on 4 warps, 64 on 8
    with pytest.raises(ValueError, match="BLOCK_V >= 64, or 32 with STAGES"):
        pick_config(64, 128, 128, operands_16_bit=True, config={"BLOCK_V": 32, "STAGES": 0})
    assert pick_config(64, 128, 128, operands_16_bit=True, config={"BLOCK_V": 32})["STAGES"] == 3  # pipelined
    with pytest.raises(ValueError, match="BLOCK_V >= 64, or 32 with STAGES"):
        pick_config(64, 128, 128, operands_16_bit=True, config={"BLOCK_V": 16, "STAGES": 2})
    assert pick_config(64, 128, 128, operands_16_bit=True, config={"BLOCK_V": 32, "STAGES": 2})["BLOCK_V"] == 32
    wider_keys = pick_config(64, 256, 128, operands_16_bit=True)  # no [256, 64] state: 32 columns, 2 stages, 8 warps
    assert (wider_keys["BLOCK_V"], wider_keys["STAGES"], wider_keys["num_warps"]) == (32, 2, 8)
    with pytest.raises(ValueError, match="TRANSPOSED_LOADS"):
        pick_config(64, 128, 128, operands_16_bit=True, config={"TRANSPOSED_LOADS": False})
    assert pick_config(64, 128, 128, operands_16_bit=True, interpret=True, config={"BLOCK_V": 16})["BLOCK_V"] == 16
    assert pick_config(64, 128, 128, sequences=1024, sm_count=132, config={"BLOCK_V": 16})["BLOCK_V"] == 16


@cuda_only
def test_cuda_matches_cpu_op_opcheck_and_compiles():
    gen = torch.Generator().manual_seed(4)
    inputs = scan_inputs(chunks=3, size=20, dtype=torch.float32, generator=gen)
    cpu_o, cpu_final, _ = delta_chunk_scan(*inputs)
    cuda_inputs = [x.cuda().requires_grad_() for x in inputs]
    o, final, _ = delta_chunk_scan(*cuda_inputs)
    assert err(o, cpu_o) < 1e-5 and err(final, cpu_final) < 1e-5
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan.default, tuple(cuda_inputs))
    detached = [x.detach() for x in cuda_inputs]
    bwd_args = (*detached[1:6], torch.randn_like(o), torch.randn_like(final))
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, bwd_args)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan_backward.default, bwd_args[:5] + (None, bwd_args[6]))
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_scan.default, tuple(bf16_matrices(detached)))
    q, k, v, beta, log_alpha, h0 = [x.cuda() for x in delta_inputs(length=100, dtype=torch.float32, generator=gen)]
    fn = torch.compile(lambda *a: chunk_delta_rule(*a, chunk_size=32)[0] * 2, fullgraph=True)
    want, _ = loop_delta_rule(*[x.double() for x in (q, k, v, beta, log_alpha, h0)], 32, 1.0)
    assert err(fn(q, k, v, beta, log_alpha, h0), 2 * want) < 1e-5


if __name__ == "__main__":
    _interpreter_checks()

"""``mmrec::delta_chunk_prepare`` (the chunk-local part of the delta rule) and its backward
against autograd through ``chunk_prepare_reference`` in float64, and, through the whole
chunked form, against the token-by-token ``naive_delta_rule``. The Triton kernels run
under Triton's interpreter in a child process (``TRITON_INTERPRET=1`` must be set before
Triton is imported); on CUDA they run compiled.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mmrec.ops.delta_rule import naive_delta_rule
from mmrec.ops.delta_rule.chunk import _chunk_delta_rule
from mmrec.ops.delta_rule.chunk_prepare import (
    OUTPUTS,
    chunk_prepare_reference,
    delta_chunk_prepare,
)
from tests.helpers import checked_rel_err as err
from tests.helpers import run_under_triton_interpreter

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON
INPUTS = ("q", "k", "v", "beta", "log_alpha")


def make_inputs(batch=2, length=37, heads=2, key_dim=24, value_dim=40, dtype=torch.float64, v_dtype=None,
                strided=False, decay=1.0, generator=None):
    """Inputs as the ``delta`` layer gives them: unit-norm ``k``, β in (0, 1), log α in
    (−decay, 0); with ``strided``, ``q`` and ``k`` halves of one tensor and ``β`` every other element."""
    kw = {"dtype": torch.float64, "generator": generator}
    qk = torch.randn(batch, length, heads, 2 * key_dim, **kw)
    q, k = qk[..., :key_dim], F.normalize(qk[..., key_dim:], dim=-1)
    v = torch.randn(batch, length, heads, value_dim, **kw)
    beta = torch.rand(batch, length, heads, 2, **kw)[..., 0]
    log_alpha = -decay * torch.rand(batch, length, heads, **kw)
    if not strided:
        q, k, beta = q.contiguous(), k.contiguous(), beta.contiguous()
    return [q.to(dtype), k.to(dtype), v.to(v_dtype or dtype), beta.to(dtype), log_alpha.to(dtype)]


def reference(inputs, chunk, probes=None):
    """Outputs of the reference in float64 and, given probes (one per differentiable
    output), the inputs' gradients of ``Σ probe ⊙ output``."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in inputs]
    outputs = chunk_prepare_reference(*leaves, chunk)
    if probes is None:
        return [o.detach() for o in outputs], None
    grads = torch.autograd.grad(outputs[:6], leaves, [p.cpu().double() for p in probes])
    return [o.detach() for o in outputs], grads


def probes_for(outputs, generator=None):
    return [torch.randn(o.shape, dtype=torch.float64, generator=generator).to(o.device, o.dtype) for o in outputs[:6]]


# ------------------------------------------------------------------ the op on CPU


@pytest.mark.parametrize("length,chunk,strided", [(37, 16, False), (37, 16, True), (9, 64, False), (64, 8, True)])
def test_op_matches_reference_float64_with_gradients(length, chunk, strided):
    # on CPU the op's forward is the reference itself (its outputs checked for dtype, layout
    # and contiguity); its backward is written out, and that is what this checks
    gen = torch.Generator().manual_seed(length + chunk)
    inputs = make_inputs(length=length, strided=strided, generator=gen)
    leaves = [x.clone().requires_grad_() for x in inputs]
    outputs = delta_chunk_prepare(*leaves, chunk)
    assert all(o.dtype == torch.float64 and o.is_contiguous() for o in outputs)
    assert not outputs[-1].requires_grad  # X is read by the backward, not differentiated
    probes = probes_for(outputs, gen)
    want, want_grads = reference(inputs, chunk, probes)
    for name, got, expected in zip(OUTPUTS, outputs, want):
        assert err(got, expected) < 1e-13, name
    grads = torch.autograd.grad(outputs[:6], leaves, probes)
    for name, got, expected in zip(INPUTS, grads, want_grads):
        assert err(got, expected) < 1e-12, name


def test_op_through_the_chunked_form_equals_the_token_loop():
    gen = torch.Generator().manual_seed(1)
    inputs = make_inputs(length=45, strided=True, generator=gen)
    h0 = torch.randn(2, 2, 24, 40, dtype=torch.float64, generator=gen)
    o, state = _chunk_delta_rule(*inputs, h0, 16, 0.5)
    want_o, want_state = naive_delta_rule(*inputs, h0, scale=0.5)
    assert err(o, want_o) < 1e-12 and err(state, want_state) < 1e-12


def test_double_backward_with_some_inputs_frozen():
    """The double-backward path differentiates only what needs a gradient (``β`` and
    ``log α`` frozen here, as a layer with fixed gates would have them)."""
    q, k, v, beta, log_alpha = make_inputs(batch=1, length=9, heads=1, key_dim=3, value_dim=2,
                                           generator=torch.Generator().manual_seed(6))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    outputs = delta_chunk_prepare(*leaves, beta, log_alpha, 4)
    grads = torch.autograd.grad(sum((o * o).sum() for o in outputs[:6]), leaves, create_graph=True)
    second = torch.autograd.grad(sum(g.sum() for g in grads), leaves)
    ref_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_outputs = chunk_prepare_reference(*ref_leaves, beta, log_alpha, 4)
    ref_grads = torch.autograd.grad(sum((o * o).sum() for o in ref_outputs[:6]), ref_leaves, create_graph=True)
    ref_second = torch.autograd.grad(sum(g.sum() for g in ref_grads), ref_leaves)
    for got, want in zip((*grads, *second), (*ref_grads, *ref_second)):
        assert err(got, want) < 1e-12


def test_gradcheck_and_gradgradcheck():
    inputs = [x.requires_grad_() for x in make_inputs(batch=1, length=7, heads=1, key_dim=3, value_dim=2,
                                                     generator=torch.Generator().manual_seed(2))]
    fn = lambda *a: delta_chunk_prepare(*a, 4)[:6]  # X is not differentiable
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_opcheck():
    inputs = make_inputs(batch=2, length=11, heads=2, key_dim=5, value_dim=3, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_prepare.default, (*[x.requires_grad_() for x in inputs], 4))
    strided = make_inputs(batch=2, length=11, heads=2, key_dim=5, value_dim=3, strided=True)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_prepare.default, (*strided, 4))
    outputs = delta_chunk_prepare(*[x.detach() for x in inputs], 4)
    args = (*[x.detach() for x in inputs], outputs[-1], outputs[4], *probes_for(outputs), 4)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_prepare_backward.default, args)


def test_bad_inputs_are_refused():
    q, k, v, beta, log_alpha = make_inputs(length=10)
    with pytest.raises(ValueError, match="beta"):
        delta_chunk_prepare(q, k, v, beta[:, :5], log_alpha, 4)
    with pytest.raises(ValueError, match="v of shape"):
        delta_chunk_prepare(q, k, v[:, :, :1], beta, log_alpha, 4)
    with pytest.raises(ValueError, match="chunk size"):
        delta_chunk_prepare(q, k, v, beta, log_alpha, 0)
    with pytest.raises(ValueError, match="in bfloat16"):
        delta_chunk_prepare(q, k, v, beta, log_alpha, 4, torch.float16)
    with pytest.raises(ValueError, match="in bfloat16"):  # float64 inputs: float64 accumulation
        delta_chunk_prepare(q, k, v, beta, log_alpha, 4, torch.bfloat16)


def test_bf16_intermediates_round_the_float32_ones():
    inputs = make_inputs(batch=2, length=11, heads=2, key_dim=5, value_dim=3, dtype=torch.float32, v_dtype=torch.float32)
    full = delta_chunk_prepare(*inputs, 4)
    half = delta_chunk_prepare(*inputs, 4, torch.bfloat16)
    assert [x.dtype for x in half] == [torch.bfloat16] * 5 + [torch.float32] * 2
    for a, b in zip(full, half):
        assert torch.equal(a.to(b.dtype), b)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_prepare.default, (*inputs, 4, torch.bfloat16))


# -------------------------------------------------- Triton kernels under the interpreter


def _interpreter_checks() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (set before Triton is imported)."""
    from mmrec.ops.delta_rule import chunk_prepare_triton as kernels
    from mmrec.ops.delta_rule import chunk_scan_triton

    gen = torch.Generator().manual_seed(0)
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    rows, blocks = {"INVERSE": "rows"}, {"INVERSE": "blocks"}  # the default is "compact"
    cases = [  # dtype, v dtype, B, T, H, K, V, chunk, strided, launch config, tolerance
        (f64, f64, 2, 37, 2, 24, 40, 16, False, {}, 1e-12),  # the last chunk ends mid-way
        (f64, f64, 1, 9, 3, 5, 3, 4, True, {}, 1e-12),  # sizes under tl.dot's 16, padded on chip
        (f64, f64, 2, 20, 1, 16, 16, 64, True, {}, 1e-12),  # one chunk shorter than the chunk size
        (f32, f32, 2, 50, 2, 32, 24, 20, True, {}, 1e-5),
        (f32, bf16, 1, 33, 2, 16, 32, 16, False, {}, 1e-5),  # bf16 values, fp32 products
        (bf16, bf16, 2, 30, 2, 16, 16, 16, True, {}, 1e-5),  # all in bf16: fp32 inside, bf16 gradients
        (f64, f64, 2, 150, 2, 24, 40, 64, True, {}, 1e-12),  # four 16-row blocks
        (f64, f64, 1, 50, 2, 8, 8, 40, False, {}, 1e-12),  # 40 rows padded to 64
        (f64, f64, 2, 150, 2, 24, 40, 64, True, rows, 1e-12),  # forward substitution over all 64 rows
        (f32, f32, 2, 45, 1, 32, 32, 20, True, {**rows, "BLOCK_D": 16}, 1e-5),
        (f64, f64, 1, 30, 2, 8, 8, 12, False, {}, 1e-12),  # one 16-row block
        # the diagonal blocks by substitution as products on the tensor cores
        (f64, f64, 2, 150, 2, 24, 40, 64, True, blocks, 1e-12),
        (f64, f64, 1, 50, 2, 8, 8, 40, False, blocks, 1e-12),
        (f32, f32, 2, 45, 1, 32, 32, 20, True, blocks, 1e-5),
        # dq, dk in three column blocks a chunk, the last one partial
        (f64, f64, 2, 150, 2, 40, 24, 64, True, {"KEYS_BLOCK_D": 16}, 1e-12),
    ]
    for dtype, v_dtype, batch, length, heads, key_dim, value_dim, chunk, strided, config, tol in cases:
        # slow decays (log α in (-0.1, 0)), so the whole chunk, not only its diagonal blocks, shapes (I + A)⁻¹
        inputs = make_inputs(batch, length, heads, key_dim, value_dim, dtype, v_dtype, strided, 0.1, generator=gen)
        acc = torch.float64 if dtype == f64 else f32
        size = min(chunk, length)
        chunks = -(-length // size)
        lead, nan = (batch, heads, chunks, size), float("nan")
        out = tuple(torch.full(shape, nan, dtype=acc) for shape in (
            (*lead, value_dim), (*lead, key_dim), (*lead, key_dim), (*lead, key_dim), (*lead, size), lead[:3], (*lead, size)))
        outputs = kernels.prepare_forward(*inputs, chunk, acc, out=out, config=config)
        probes = probes_for(outputs, gen)
        want, want_grads = reference(inputs, chunk, probes)
        errs = {name: err(got, expected) for name, got, expected in zip(OUTPUTS, outputs, want)}
        grad_out = tuple(torch.full(x.shape, nan, dtype=x.dtype) for x in inputs)
        grads = kernels.prepare_backward(*inputs, outputs[-1], outputs[4], tuple(probes), out=grad_out, config=config)
        tols = dict.fromkeys(errs, tol)
        for name, x, got, expected in zip(INPUTS, inputs, grads, want_grads):
            assert got.dtype == x.dtype and got.shape == x.shape, name
            errs["d" + name] = err(got, expected)
            tols["d" + name] = 1e-2 if x.dtype == bf16 else tol  # a gradient rounded to bf16
        label = (f"{dtype} v {v_dtype} B={batch} T={length} H={heads} K={key_dim} V={value_dim} C={chunk} "
                 f"strided={strided} {config}")
        bad = {k: v for k, v in errs.items() if not v < tols[k]}
        assert not bad, f"{label}: {bad}"
        print(f"ok {label}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))

    # the chunk loop's matrices stored in bf16: the same values rounded, and their bf16
    # gradients read as they are, in bf16 products (rounded as on the GPU)
    inputs = make_inputs(2, 37, 2, 24, 40, f32, bf16, True, 0.1, generator=gen)
    outputs = kernels.prepare_forward(*inputs, 16, f32, bf16)
    assert [x.dtype for x in outputs] == [bf16] * 5 + [f32] * 2
    probes = [p.to(x.dtype) for p, x in zip(probes_for(outputs, gen), outputs)]
    want, want_grads = reference(inputs, 16, probes)
    errs = {name: err(got, expected) for name, got, expected in zip(OUTPUTS, outputs, want)}
    grads = kernels.prepare_backward(*inputs, outputs[-1], outputs[4], tuple(probes))
    errs.update({"d" + name: err(got, expected) for name, got, expected in zip(INPUTS, grads, want_grads)})
    tols = {name: 5e-3 if name in OUTPUTS[:5] else 1e-5 if name in OUTPUTS else 2e-2 for name in errs}
    bad = {k: v for k, v in errs.items() if not v < tols[k]}
    assert not bad, f"bf16 intermediates: {bad}"
    print("ok bf16 intermediates: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))

    # both kernels of the chunked form (this one and the chunk loop's) against the token loop
    inputs = make_inputs(2, 21, 2, 24, 40, f64, strided=True, generator=gen)
    h0 = torch.randn(2, 2, 24, 40, dtype=f64, generator=gen)
    prepare = lambda *a: kernels.prepare_forward(*a[:6], f64, a[6])  # noqa: E731 (a[6]: the intermediates' dtype)
    o, state = _chunk_delta_rule(*inputs, h0, 8, 0.7, prepare=prepare, scan=chunk_scan_triton.chunk_scan_forward)
    want_o, want_state = naive_delta_rule(*inputs, h0, scale=0.7)
    assert err(o, want_o) < 1e-12 and err(state, want_state) < 1e-12
    print("ok the chunked form on both kernels")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_triton_interpreter():
    out = run_under_triton_interpreter(__file__)
    assert out.count("ok ") == 17, out


# ----------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")


@cuda_only
@pytest.mark.parametrize("inverse", ["rows", "blocks", "compact"])
@pytest.mark.parametrize("head_dim", [64, 128])
# tf32 rounds each operand to 10 bits (2^-11 relative): the outputs and gradients land near
# 1e-3; a miscompiled product is off by 1e-2 and more (a loop-carried pair of products
# sharing an operand was, in some launch configs, under Triton 3.6 on Hopper)
@pytest.mark.parametrize("precision,tol", [("highest", 1e-5), ("high", 3e-3)])
def test_cuda_kernels_against_float64(head_dim, precision, tol, inverse):
    """The launchers, compiled, at a training size (bf16 values as the layer gives them),
    poisoned outputs, against autograd through the reference in float64. ``high`` runs
    the products on tf32 (about 1e-3 relative per product)."""
    _check_cuda_launch(head_dim, precision, tol, {"INVERSE": inverse})


LAUNCH_CONFIGS = [{"num_warps": 4, "INVERSE": "rows"}, {"num_warps": 8}, {"BLOCK_D": 16}, {"BLOCK_D": 64},
                  {"BLOCK_D": 16, "num_warps": 4}, {"BLOCK_D": 64, "num_warps": 4}, {"INVERSE": "blocks"},
                  {"num_warps": 8, "INVERSE": "blocks"}, {"KEYS_BLOCK_D": 16}, {"KEYS_BLOCK_D": 64, "KEYS_WARPS": 8},
                  {"KEYS_BLOCK_D": 128, "KEYS_WARPS": 8}]


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("config", LAUNCH_CONFIGS, ids=str)
def test_cuda_launch_configs_against_float64_and_repeatable(head_dim, config):
    """Every launch config the benchmarks try gives tf32's accuracy, and the same bits twice."""
    _check_cuda_launch(head_dim, "high", 3e-3, config, repeat=True)


@cuda_only
@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("inverse", ["compact", "blocks"])
def test_cuda_inverse_at_shorter_chunks(chunk, inverse):
    """One and two 16-row blocks: the blocked inverses' smallest shapes, compiled."""
    _check_cuda_launch(64, "high", 3e-3, {"INVERSE": inverse}, chunk=chunk)


def test_an_unknown_inverse_is_refused():
    from mmrec.ops.delta_rule.chunk_prepare_triton import pick_config

    with pytest.raises(ValueError, match="INVERSE must be one of"):
        pick_config(64, 128, 128, interpret=True, config={"INVERSE": "block"})
    assert pick_config(64, 128, 128, interpret=True)["INVERSE"] == "compact"


def test_the_backward_of_bf16_gradients_takes_bf16_products():
    from mmrec.ops.delta_rule.chunk_prepare_triton import launch_config, pick_config

    backward = functools.partial(pick_config, 64, 128, 128, backward=True)
    assert backward(bf16_grads=True)["PRECISION"] == "bf16"
    assert backward(bf16_grads=True, interpret=True)["PRECISION"] == "bf16-interpret"  # the same rounding
    assert backward(interpret=True)["PRECISION"] == "ieee"
    assert backward(bf16_grads=True, config={"PRECISION": "tf32"})["PRECISION"] == "tf32"  # an override wins
    assert pick_config(64, 128, 128)["PRECISION"] != "bf16"  # the forward keeps fp32 products
    # the cached configs keep the two cases apart, in either order
    assert launch_config(64, 128, 128, backward=True)["PRECISION"] != "bf16"
    assert launch_config(64, 128, 128, backward=True, bf16_grads=True)["PRECISION"] == "bf16"
    assert launch_config(64, 128, 128, backward=True)["PRECISION"] != "bf16"


def test_the_dq_dk_config_that_fails_with_bf16_products_is_refused():
    from mmrec.ops.delta_rule.chunk_prepare_triton import pick_config

    with pytest.raises(ValueError, match="KEYS_BLOCK_D=32"):
        pick_config(64, 128, 128, backward=True, bf16_grads=True, config={"KEYS_BLOCK_D": 32})
    assert pick_config(64, 128, 128, backward=True, bf16_grads=True)["KEYS_BLOCK_D"] == 64
    for key_dim in (17, 24, 32):  # a whole key of 32 columns takes 16 a program by default, never 32
        assert pick_config(64, key_dim, 64, backward=True, bf16_grads=True)["KEYS_BLOCK_D"] == 16
    assert "KEYS_BLOCK_D" not in pick_config(64, 128, 128, config={"KEYS_BLOCK_D": 16})  # the forward has no such kernel


def _check_cuda_launch(head_dim, precision, tol, config, repeat=False, chunk=64, intermediates=None):
    from mmrec.ops.delta_rule import chunk_prepare_triton as kernels

    gen = torch.Generator().manual_seed(head_dim)
    inputs = [x.cuda() for x in make_inputs(2, 2048 - 7, 8, head_dim, head_dim, torch.float32, torch.bfloat16,
                                            strided=True, decay=0.05, generator=gen)]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        outputs = kernels.prepare_forward(*inputs, chunk, torch.float32, intermediates, config=config)
        probes = probes_for(outputs, gen)
        grads = kernels.prepare_backward(*inputs, outputs[-1], outputs[4], tuple(probes), config=config)
        if repeat:
            again = kernels.prepare_forward(*inputs, chunk, torch.float32, intermediates, config=config)
            grads_again = kernels.prepare_backward(*inputs, again[-1], again[4], tuple(probes), config=config)
            for name, first, second in zip(OUTPUTS + INPUTS, outputs + grads, again + grads_again):
                assert torch.equal(first, second), f"{name} differs between two identical launches"
    finally:
        torch.set_float32_matmul_precision(before)
    want, want_grads = reference(inputs, chunk, probes)
    for name, got, expected in zip(OUTPUTS, outputs, want):
        assert err(got, expected) < tol, name
    for name, x, got, expected in zip(INPUTS, inputs, grads, want_grads):
        assert got.dtype == x.dtype, name
        assert err(got, expected) < (tol if x.dtype == torch.float32 else max(tol, 1e-2)), name


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_bf16_intermediates_against_float64_and_repeatable(head_dim):
    """Outputs stored in bf16, and the backward of their bf16 gradients in bf16 products
    (each operand rounded once: about 3e-3 relative at these sizes)."""
    _check_cuda_launch(head_dim, "high", 1e-2, {}, repeat=True, intermediates=torch.bfloat16)


@cuda_only
def test_cuda_matches_cpu_op_opcheck_and_compiles():
    gen = torch.Generator().manual_seed(5)
    inputs = make_inputs(length=50, dtype=torch.float32, strided=True, generator=gen)
    cpu = delta_chunk_prepare(*inputs, 16)
    cuda_inputs = [x.cuda().requires_grad_() for x in inputs]
    outputs = delta_chunk_prepare(*cuda_inputs, 16)
    for name, got, want in zip(OUTPUTS, outputs, cpu):
        assert err(got, want) < 1e-5, name
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_prepare.default, (*cuda_inputs, 16))
    detached = [x.detach() for x in cuda_inputs]
    args = (*detached, outputs[-1], outputs[4], *probes_for(outputs, gen), 16)
    torch.library.opcheck(torch.ops.mmrec.delta_chunk_prepare_backward.default, args)
    compiled = torch.compile(lambda *a: delta_chunk_prepare(*a, 16)[0] * 2, fullgraph=True)
    assert err(compiled(*detached), 2 * cpu[0]) < 1e-5
    # chunks longer than the kernels' 64 run the PyTorch products on the GPU too
    long_chunks = delta_chunk_prepare(*detached, 128)
    for name, got, want in zip(OUTPUTS, long_chunks, delta_chunk_prepare(*inputs, 128)):
        assert err(got, want) < 1e-5, name


if __name__ == "__main__":
    _interpreter_checks()

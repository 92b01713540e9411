"""``mmrec::gated_rnn`` (the ``exact`` recurrence) against float64 references.

The Triton kernels run under Triton's interpreter without a GPU (``TRITON_INTERPRET=1``,
which must be set before Triton is imported, so those checks run in a child process that
executes this file); on CUDA they run compiled, through the op and its autograd.
"""

import importlib.util

import pytest
import torch

from mmrec.ops.gated_rnn import gated_rnn, gated_rnn_reference
from tests.helpers import ops_called, rel_err, run_under_triton_interpreter


def dense_loop(z, log_decay, weight, h0):
    """The formula with W_g as one dense block-diagonal matrix, written independently."""
    dense = torch.block_diag(*weight)
    h, out = h0, []
    for t in range(z.shape[1]):
        h = z[:, t] * torch.sigmoid(h @ dense) + log_decay[:, t].exp() * h
        out.append(h)
    return torch.stack(out, 1), h


def test_matches_dense_formula_float64_with_gradients():
    heads, head_dim, length = 3, 5, 11
    z = torch.randn(2, length, heads * head_dim, dtype=torch.float64, requires_grad=True)
    log_decay = torch.empty(2, length, heads * head_dim, dtype=torch.float64).uniform_(-1, -0.01).requires_grad_()
    weight = torch.randn(heads, head_dim, head_dim, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, heads * head_dim, dtype=torch.float64, requires_grad=True)
    h, h_last = gated_rnn_reference(z, log_decay, weight, h0)
    ref, ref_last = dense_loop(z, log_decay, weight, h0)
    assert rel_err(h, ref) < 1e-12 and rel_err(h_last, ref_last) < 1e-12
    probe = torch.randn_like(h)
    grads = torch.autograd.grad((h * probe).sum(), (z, log_decay, weight, h0))
    ref_grads = torch.autograd.grad((ref * probe).sum(), (z, log_decay, weight, h0))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-12


# ------------------------------------------------------------- the op mmrec::gated_rnn

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON


def err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in float64 on CPU; absolute where the expected value is all zeros."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite values (unwritten output?)"
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def make_inputs(batch, length, heads, head_dim, dtype=torch.float64, device="cpu", h0=True, weight_scale=1.0, generator=None):
    """Fresh random inputs: z ~ N(0, 1), log γ in [-1, -0.01), W ~ N(0, scale²/E), h0 ~ N(0, 1).

    ``dtype`` is one dtype for all four, or a tuple ``(z, log γ, W, h0)``.
    """
    dim = heads * head_dim
    kw = {"dtype": torch.float64, "generator": generator}
    z = torch.randn(batch, length, dim, **kw)
    log_decay = torch.rand(batch, length, dim, **kw) * -0.99 - 0.01
    weight = torch.randn(heads, head_dim, head_dim, **kw) * weight_scale / head_dim**0.5
    start = torch.randn(batch, dim, **kw) if h0 else None
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,) * 4
    out = [x.to(d).to(device) for x, d in zip((z, log_decay, weight), dtypes)]
    return (*out, None if start is None else start.to(dtypes[3]).to(device))


def reference_grads(z, log_decay, weight, h0, grad_h, grad_h_last):
    """Float64 autograd through ``gated_rnn_reference``; grad_h / grad_h_last may be None."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in (z, log_decay, weight)]
    if h0 is not None:
        leaves.append(h0.detach().cpu().double().requires_grad_())
    h, h_last = gated_rnn_reference(*leaves[:3], leaves[3] if h0 is not None else None)
    loss = 0.0
    if grad_h is not None:
        loss = loss + (h * grad_h.detach().cpu().double()).sum()
    if grad_h_last is not None:
        loss = loss + (h_last * grad_h_last.detach().cpu().double()).sum()
    return (h.detach(), h_last.detach()), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("length", [1, 13])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("outputs", ["both", "h", "h_last"])
def test_op_matches_reference_float64(length, with_h0, outputs):
    z, log_decay, weight, h0 = make_inputs(3, length, 3, 5, h0=with_h0)
    args = [t.clone().requires_grad_() if t is not None else None for t in (z, log_decay, weight, h0)]
    h, h_last = gated_rnn(*args)
    grad_h = torch.randn_like(h) if outputs != "h_last" else None
    grad_hl = torch.randn_like(h_last) if outputs != "h" else None
    (ref_h, ref_last), refs = reference_grads(z, log_decay, weight, h0, grad_h, grad_hl)
    assert h.dtype == h_last.dtype == torch.float64
    assert err(h, ref_h) < 1e-12 and err(h_last, ref_last) < 1e-12
    torch.testing.assert_close(h_last, h[:, -1])
    leaves = [a for a in args if a is not None]
    pairs = [(o, g) for o, g in ((h, grad_h), (h_last, grad_hl)) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs])
    for name, got, want in zip(("z", "log_decay", "weight", "h0"), grads, refs):
        assert got.shape == want.shape and got.dtype == torch.float64, name
        assert err(got, want) < 1e-10, name


def test_float32_against_float64_reference():
    z, log_decay, weight, h0 = make_inputs(3, 40, 3, 5, dtype=torch.float32)
    args = [t.clone().requires_grad_() for t in (z, log_decay, weight, h0)]
    h, h_last = gated_rnn(*args)
    assert h.dtype == torch.float32
    grad_h, grad_hl = torch.randn_like(h), torch.randn_like(h_last)
    (ref_h, ref_last), refs = reference_grads(z, log_decay, weight, h0, grad_h, grad_hl)
    assert err(h, ref_h) < 1e-5 and err(h_last, ref_last) < 1e-5
    grads = torch.autograd.grad([h, h_last], args, [grad_h, grad_hl])
    for name, got, want in zip(("z", "log_decay", "weight", "h0"), grads, refs):
        assert err(got, want) < 1e-5, name


def test_mixed_dtypes_state_in_float32():
    # as in the model: z (and W, h0) in bfloat16, log γ in float32 from MDI
    z, log_decay, weight, h0 = make_inputs(2, 30, 2, 8, dtype=(torch.bfloat16, torch.float32, torch.bfloat16, torch.float32))
    args = [t.clone().requires_grad_() for t in (z, log_decay, weight, h0)]
    h, h_last = gated_rnn(*args)
    assert h.dtype == h_last.dtype == torch.float32
    (ref_h, _), refs = reference_grads(z, log_decay, weight, h0, torch.ones_like(h), None)
    assert err(h, ref_h) < 1e-5
    grads = torch.autograd.grad(h.sum(), args)
    for arg, got, want in zip(args, grads, refs):
        assert got.dtype == arg.dtype
        assert err(got, want) < (1e-2 if arg.dtype == torch.bfloat16 else 1e-5)


def test_layer_runs_the_op():
    from mmrec.layers.exact_recurrence import ExactRecurrence

    recurrence = ExactRecurrence(ExactRecurrence.Config(), d_model=12, n_heads=3).double()
    z, log_decay, _, h0 = make_inputs(2, 9, 3, 4)
    h, h_last = recurrence(z, log_decay, None, h0)
    called = ops_called(lambda: recurrence(z, log_decay, None, h0)[0].sum().backward())
    assert called == ["mmrec::gated_rnn", "mmrec::gated_rnn_backward"]
    ref, ref_last = gated_rnn_reference(z, log_decay, recurrence.gate_weight, h0)
    assert err(h, ref) < 1e-12 and err(h_last, ref_last) < 1e-12


def test_empty_sequence_returns_initial_state():
    z, log_decay, weight, h0 = make_inputs(2, 0, 2, 3)
    h, h_last = gated_rnn(z, log_decay, weight, h0)
    assert h.shape == (2, 0, 6)
    torch.testing.assert_close(h_last, h0)
    assert h_last.data_ptr() != h0.data_ptr()


def test_bad_shapes_are_refused():
    z, log_decay, weight, h0 = make_inputs(2, 4, 2, 3)
    with pytest.raises(ValueError, match="weight"):
        gated_rnn(z, log_decay, weight[:, :2, :2], h0)
    with pytest.raises(ValueError, match="h0"):
        gated_rnn(z, log_decay, weight, h0[:, :5])
    with pytest.raises(ValueError, match="same"):
        gated_rnn(z, log_decay[:, :3], weight, h0)


def test_gradcheck_gradgradcheck_and_opcheck():
    z, log_decay, weight, h0 = (t.requires_grad_() for t in make_inputs(2, 6, 2, 3))
    assert torch.autograd.gradcheck(gated_rnn, (z, log_decay, weight, h0))
    assert torch.autograd.gradgradcheck(lambda *a: gated_rnn(*a)[0], (z, log_decay, weight, h0))
    torch.library.opcheck(torch.ops.mmrec.gated_rnn.default, (z, log_decay, weight, h0))
    torch.library.opcheck(torch.ops.mmrec.gated_rnn.default, (z, log_decay, weight, None))
    h, _ = gated_rnn(z.detach(), log_decay.detach(), weight.detach(), h0.detach())
    args = (z.detach(), log_decay.detach(), weight.detach(), h0.detach(), h, torch.randn_like(h), torch.randn_like(h0))
    torch.library.opcheck(torch.ops.mmrec.gated_rnn_backward.default, args)
    torch.library.opcheck(torch.ops.mmrec.gated_rnn_backward.default, args[:3] + (None, h, None, torch.randn_like(h0)))


# -------------------------------------------------- Triton kernels under the interpreter


def _interpreter_checks() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (set before Triton is imported)."""
    from mmrec.ops import gated_rnn_triton as kernels

    gen = torch.Generator().manual_seed(0)
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    one = {"BLOCK_B": 1}  # one sequence per program
    cases = [  # dtypes (z, log γ, W, h0), B, T, H, E, h0, grad_h, grad_h_last, layout, launch config, tolerance
        ((f32, f32, f32, f32), 3, 13, 3, 5, True, True, True, "contiguous", one, 1e-5),
        ((f32, f32, f32, f32), 2, 9, 2, 16, False, True, False, "contiguous", one, 1e-5),
        ((f32, f32, f32, f32), 2, 1, 2, 3, True, False, True, "strided", one, 1e-5),
        ((f32, f32, f32, f32), 1, 11, 2, 7, True, True, False, "strided", one, 1e-5),
        ((bf16, f32, bf16, f32), 2, 10, 2, 8, True, True, True, "contiguous", one, 1e-5),
        ((f64, f64, f64, f64), 2, 8, 3, 5, True, True, True, "contiguous", one, 1e-12),
        # blocks of sequences with tl.dot: batch rows and head columns masked
        ((f32, f32, f32, f32), 3, 13, 2, 5, True, True, True, "contiguous", {"BLOCK_B": 16}, 1e-5),
        ((f32, f32, f32, f32), 19, 6, 2, 7, False, True, False, "strided", {"BLOCK_B": 16}, 1e-5),
        ((bf16, f32, bf16, f32), 5, 9, 2, 8, True, True, True, "contiguous", {"BLOCK_B": 16, "SPLIT": True}, 1e-5),
        ((bf16, f32, bf16, f32), 17, 5, 1, 16, True, False, True, "strided", {"BLOCK_B": 32, "SPLIT": True}, 1e-5),
        # one rounding to bf16 per product: about bf16 accuracy
        ((bf16, f32, bf16, f32), 17, 7, 1, 16, True, True, True, "contiguous", {"BLOCK_B": 16, "SPLIT": False}, 1e-2),
    ]
    for dtypes, batch, length, heads, head_dim, with_h0, with_gh, with_ghl, layout, config, tol in cases:
        z, log_decay, weight, h0 = make_inputs(batch, length, heads, head_dim, dtype=dtypes, h0=with_h0, generator=gen)
        if layout == "strided":  # z time-major in memory, log γ every other channel, W transposed
            z = z.transpose(0, 1).contiguous().transpose(0, 1)
            log_decay = torch.cat([log_decay, log_decay], dim=2)[:, :, ::2]
            weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
            assert not (log_decay.is_contiguous() or weight.is_contiguous())
        dim = heads * head_dim
        out_dtype = log_decay.dtype
        nan = float("nan")
        out = (torch.full((batch, length, dim), nan, dtype=out_dtype), torch.full((batch, dim), nan, dtype=out_dtype))
        h, h_last = kernels.gated_rnn_forward(z, log_decay, weight, h0, out=out, config=config)
        grad_h = torch.randn(batch, length, dim, generator=gen).to(out_dtype) if with_gh else None
        grad_hl = torch.randn(batch, dim, generator=gen).to(out_dtype) if with_ghl else None
        (ref_h, ref_last), refs = reference_grads(z, log_decay, weight, h0, grad_h, grad_hl)
        errs = {"h": err(h, ref_h), "h_last": err(h_last, ref_last)}
        gouts = (torch.full(z.shape, nan, dtype=z.dtype), torch.full(log_decay.shape, nan, dtype=log_decay.dtype),
                 torch.full(h0.shape, nan, dtype=h0.dtype) if with_h0 else torch.empty(0, dtype=out_dtype))
        if layout == "strided":  # the kernels write contiguous layouts and say so
            try:
                kernels.gated_rnn_forward(z, log_decay, weight, h0, out=(torch.cat([out[0], out[0]], dim=2)[:, :, ::2], out[1]), config=config)
            except ValueError as e:
                assert "contiguous" in str(e), e
            else:
                raise AssertionError("a strided out tensor was accepted")
            try:
                kernels.gated_rnn_backward(z, log_decay, weight, h0, h, grad_h, grad_hl,
                                           out=(torch.cat([gouts[0], gouts[0]], dim=2)[:, :, ::2], *gouts[1:]),
                                           config=config)
            except ValueError as e:
                assert "contiguous" in str(e), e
            else:
                raise AssertionError("a strided out tensor was accepted")
        grads = kernels.gated_rnn_backward(z, log_decay, weight, h0, h, grad_h, grad_hl, out=gouts, config=config)
        for name, arg, got, want in zip(("dz", "dlog_decay", "dW", "dh0"), (z, log_decay, weight, h0), grads, refs):
            assert got.dtype == arg.dtype and got.shape == want.shape, name
            errs[name] = err(got, want)
        bad = {k: v for k, v in errs.items() if not v < (1e-2 if k in ("dz", "dW") and dtypes[0] == bf16 else tol)}
        label = f"{dtypes[0]} B={batch} T={length} H={heads} E={head_dim} h0={with_h0} gh={with_gh} ghl={with_ghl} {layout} {config}"
        assert not bad, f"{label}: {bad}"
        print(f"ok {label}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_triton_interpreter():
    out = run_under_triton_interpreter(__file__)
    assert out.count("ok ") == 11, out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_launch_config_choice():
    from mmrec.ops.gated_rnn_triton import pick_config

    def block_b(batch, heads=32, **kw):
        return pick_config(batch, heads, 128, device=torch.device("cpu"), weight_dtype=torch.bfloat16, **kw)["BLOCK_B"]

    assert block_b(4) == 1  # small batches: one program per sequence
    assert block_b(64) == 16 and block_b(128) == 32 and block_b(1024) == 64  # one wave of 132 SMs while it fits
    assert block_b(64, fp64=True) == 1
    assert block_b(4, config={"BLOCK_B": 32}) == 32
    cfg = pick_config(64, 32, 128, device=torch.device("cpu"), weight_dtype=torch.float32)
    assert cfg["SPLIT"] is False and cfg["PRECISION"] == "ieee"
    with pytest.raises(ValueError, match="power of two"):
        block_b(64, config={"BLOCK_B": 8})
    with pytest.raises(ValueError, match="float64"):
        block_b(64, fp64=True, config={"BLOCK_B": 16})


# ----------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and triton")


@cuda_only
@pytest.mark.parametrize(
    "dtypes,tol",
    [
        ((torch.bfloat16,) * 4, 1e-2),
        ((torch.bfloat16, torch.float32, torch.bfloat16, torch.float32), 1e-2),
        ((torch.float32,) * 4, 1e-5),
    ],
)
def test_cuda_op_forward_and_gradients(dtypes, tol):
    gen = torch.Generator().manual_seed(11)
    z, log_decay, weight, h0 = make_inputs(4, 1000, 4, 128, dtype=dtypes, device="cuda", weight_scale=0.5, generator=gen)
    args = [t.requires_grad_() for t in (z, log_decay, weight, h0)]
    h, h_last = gated_rnn(*args)
    assert h.dtype == h_last.dtype == log_decay.dtype
    grad_h = torch.randn(h.shape, generator=gen).to(h.dtype).cuda()
    grad_hl = torch.randn(h_last.shape, generator=gen).to(h.dtype).cuda()
    (ref_h, ref_last), refs = reference_grads(z, log_decay, weight, h0, grad_h, grad_hl)
    assert err(h.cpu(), ref_h) < tol and err(h_last.cpu(), ref_last) < tol
    grads = torch.autograd.grad([h, h_last], args, [grad_h, grad_hl])
    for name, arg, got, want in zip(("z", "log_decay", "weight", "h0"), args, grads, refs):
        assert got.dtype == arg.dtype, name
        assert err(got.cpu(), want) < tol, name


@cuda_only
@pytest.mark.parametrize("head_dim", [128, 40])
@pytest.mark.parametrize(
    "dtypes,config,tol",
    [
        ((torch.bfloat16, torch.float32, torch.bfloat16, torch.float32), {"BLOCK_B": 16, "SPLIT": True}, 1e-4),
        ((torch.bfloat16, torch.float32, torch.bfloat16, torch.float32), {"BLOCK_B": 32, "SPLIT": False}, 1e-2),
        ((torch.bfloat16,) * 4, {"BLOCK_B": 64, "num_warps": 8}, 1e-2),
        ((torch.float32,) * 4, {"BLOCK_B": 16}, 1e-5),
        ((torch.float32,) * 4, {"BLOCK_B": 16, "PRECISION": "tf32x3"}, 1e-4),
    ],
)
def test_cuda_blocked_kernels(head_dim, dtypes, config, tol):
    from mmrec.ops import gated_rnn_triton as kernels

    gen = torch.Generator().manual_seed(13)
    z, log_decay, weight, h0 = make_inputs(37, 300, 3, head_dim, dtype=dtypes, device="cuda", weight_scale=0.5, generator=gen)
    h, h_last = kernels.gated_rnn_forward(z, log_decay, weight, h0, config=config)
    grad_h = torch.randn(h.shape, generator=gen).to(h.dtype).cuda()
    grad_hl = torch.randn(h_last.shape, generator=gen).to(h.dtype).cuda()
    grads = kernels.gated_rnn_backward(z, log_decay, weight, h0, h, grad_h, grad_hl, config=config)
    (ref_h, ref_last), refs = reference_grads(z, log_decay, weight, h0, grad_h, grad_hl)
    assert err(h, ref_h) < tol and err(h_last, ref_last) < tol
    for name, arg, got, want in zip(("z", "log_decay", "weight", "h0"), (z, log_decay, weight, h0), grads, refs):
        assert got.dtype == arg.dtype, name
        assert err(got, want) < (1e-2 if arg.dtype == torch.bfloat16 else tol), name


@cuda_only
def test_cuda_op_blocked_by_default_at_large_batch():
    gen = torch.Generator().manual_seed(14)
    z, log_decay, weight, h0 = make_inputs(64, 200, 2, 128, dtype=(torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),
                                           device="cuda", weight_scale=0.5, generator=gen)
    args = [t.requires_grad_() for t in (z, log_decay, weight, h0)]
    h, h_last = gated_rnn(*args)
    (ref_h, _), refs = reference_grads(z, log_decay, weight, h0, torch.ones_like(h), None)
    assert err(h, ref_h) < 1e-4
    for arg, got, want in zip(args, torch.autograd.grad(h.sum(), args), refs):
        assert err(got, want) < (1e-2 if arg.dtype == torch.bfloat16 else 1e-4)


@cuda_only
def test_cuda_matches_cpu_op_and_opcheck():
    gen = torch.Generator().manual_seed(12)
    z, log_decay, weight, h0 = make_inputs(3, 70, 3, 5, dtype=torch.float32, generator=gen)
    cpu_h, cpu_last = gated_rnn(z, log_decay, weight, h0)
    cuda_args = [t.cuda().requires_grad_() for t in (z, log_decay, weight, h0)]
    h, h_last = gated_rnn(*cuda_args)
    assert err(h.cpu(), cpu_h) < 1e-5 and err(h_last.cpu(), cpu_last) < 1e-5
    torch.library.opcheck(torch.ops.mmrec.gated_rnn.default, tuple(cuda_args))
    torch.library.opcheck(torch.ops.mmrec.gated_rnn.default, tuple(cuda_args[:3]) + (None,))
    detached = [t.detach() for t in cuda_args]
    bwd_args = (*detached, h.detach(), torch.randn_like(h), torch.randn_like(h_last))
    torch.library.opcheck(torch.ops.mmrec.gated_rnn_backward.default, bwd_args)
    fn = torch.compile(lambda *a: gated_rnn(*a)[0] * 2, fullgraph=True)
    assert err(fn(*detached).cpu(), 2 * cpu_h) < 1e-5


if __name__ == "__main__":
    _interpreter_checks()

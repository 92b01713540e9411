import torch

from mmrec.layers.ffn import SwiGLU
from mmrec.layers.norm import RMSNorm
from mmrec.layers.projection import FusedProjection, fuse_state_dict, split_state_dict
from tests.helpers import rel_err


def test_rmsnorm_matches_formula_float64():
    norm = RMSNorm(13, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 13, dtype=torch.float64, requires_grad=True)
    ref = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight
    assert rel_err(norm(x), ref) < 1e-12
    grad = torch.autograd.grad(norm(x).sum(), x)[0]
    assert rel_err(grad, torch.autograd.grad(ref.sum(), x)[0]) < 1e-10


def test_rmsnorm_keeps_low_precision_dtype():
    x = torch.randn(2, 5, 8).bfloat16()
    assert RMSNorm(8)(x).dtype == torch.bfloat16


def test_swiglu_matches_formula_float64():
    ffn = SwiGLU(11, 17).double()
    x = torch.randn(2, 5, 11, dtype=torch.float64)
    gate_w, up_w = ffn.gate_up.weight.chunk(2, dim=0)
    ref = (torch.nn.functional.silu(x @ gate_w.T) * (x @ up_w.T)) @ ffn.down.weight.T
    assert rel_err(ffn(x), ref) < 1e-12


def test_fused_and_separate_projections_are_the_same_function():
    widths = {"q": 6, "k": 5, "z": 7}
    separate = FusedProjection(9, widths, fused=False, bias=True).double()
    fused = FusedProjection(9, widths, fused=True, bias=True).double()
    fused.load_state_dict(fuse_state_dict(separate.state_dict(), widths))
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    out_fused, out_separate = fused(x), separate(x)
    for name, width in widths.items():
        assert out_fused[name].shape == (2, 3, width)
        torch.testing.assert_close(out_fused[name], out_separate[name])
    round_trip = split_state_dict(fused.state_dict(), widths)
    for key, value in separate.state_dict().items():
        torch.testing.assert_close(round_trip[key], value)

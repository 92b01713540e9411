import pytest
import torch

from mmrec.layers.mdi import MDI
from tests.helpers import rel_err


def test_mdi_matches_formula_float64_with_gradients():
    mdi = MDI(9, 5, decay_init=0.9).double()
    for p in mdi.parameters():
        torch.nn.init.normal_(p)
    z = torch.randn(2, 7, 9, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.sigmoid(z @ mdi.decay.weight.T + mdi.decay_bias) * torch.sigmoid(k @ mdi.context.weight.T + mdi.context_bias)
    log_gamma = mdi(z, k)
    assert rel_err(log_gamma.exp(), gamma) < 1e-12
    probe = torch.randn_like(gamma)
    got = torch.autograd.grad((log_gamma.exp() * probe).sum(), (z, k))
    want = torch.autograd.grad((gamma * probe).sum(), (z, k))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


def test_decay_starts_near_decay_init():
    mdi = MDI(64, 32, decay_init=0.99)
    mdi.init_weights()
    gamma = mdi(torch.randn(4, 10, 64), torch.randn(4, 10, 32)).exp()
    assert (gamma - 0.99).abs().max() < 0.01


def test_decay_range_spreads_time_constants():
    mdi = MDI(64, 32, decay_init=(0.9, 0.999))
    gamma = mdi(torch.randn(2, 5, 64), torch.randn(2, 5, 32)).exp().mean((0, 1))
    assert abs(gamma[0] - 0.9) < 0.01 and abs(gamma[-1] - 0.999) < 0.001
    timescales = 1 / (1 - mdi.initial_decay())
    ratios = timescales[1:] / timescales[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))  # even in log scale


def test_log_decay_in_the_activations_dtype_or_on_request():
    """bf16 ``log γ`` is the float32 one rounded once: a relative error of at most 2^-8 of
    ``log γ``, so ``γ`` is off by a tiny fraction of ``1 - γ`` (time constants barely move)."""
    torch.manual_seed(0)
    mdi = MDI(40, 24, decay_init=(0.9, 0.9999)).bfloat16()
    z, k = torch.randn(3, 11, 40).bfloat16().requires_grad_(), torch.randn(3, 11, 24).bfloat16().requires_grad_()
    log_gamma, wide = mdi(z, k), mdi(z, k, torch.float32)
    assert log_gamma.dtype == torch.bfloat16 and wide.dtype == torch.float32
    log_err = ((log_gamma.double() - wide.double()) / wide.double()).abs().max()
    assert 0 < log_err <= 2**-8, log_err
    gamma = wide.double().exp()
    gamma_err = ((log_gamma.double().exp() - gamma) / (1 - gamma)).abs().max()
    assert gamma_err < 2**-8, gamma_err
    # the gradient through the bf16 output is the float32 one's, to bf16 precision
    probe = torch.randn(wide.shape)
    got = torch.autograd.grad((log_gamma.float() * probe).sum(), (z, k))
    want = torch.autograd.grad((wide * probe).sum(), (z, k))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and 0 < rel_err(g, w) < 1e-2


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, None)])
def test_compiled_gradients_equal_eager(dtype, out_dtype):
    # PyTorch 2.11 compiled the log-sigmoid Function with zero gradients when its output
    # needed no cast (float32 in, float32 out), which silently froze every decay in
    # compiled float32 training: the compiled graph must give eager's gradients.
    mdi = MDI(9, 5, decay_init=(0.6, 0.95)).to(dtype)
    z = torch.randn(2, 7, 9, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 7, 5, dtype=dtype, requires_grad=True)
    probe = torch.randn(2, 7, 9, dtype=torch.float64)
    inputs = (z, k, *mdi.parameters())

    def gradients(fn):
        return torch.autograd.grad((fn(z, k, out_dtype).double() * probe).sum(), inputs)

    torch._dynamo.reset()
    for got, want in zip(gradients(torch.compile(mdi, backend="aot_eager")), gradients(mdi)):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("width", [9, 3, 1])  # per channel, per head of 3 channels, one for all
def test_gated_integration_matches_formula_float64_with_gradients(width):
    mdi = MDI(9, 5, decay_init=0.9, width=width, integration=True).double()
    for p in mdi.parameters():
        torch.nn.init.normal_(p)
    h, z = (torch.randn(2, 7, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    log_gamma = mdi(z, k)
    # written channel by channel: channel c takes decay c // (9 // width)
    w, b = mdi.integration.weight, mdi.integration.bias
    gate = torch.sigmoid(z @ w[:, :9].T + h @ w[:, 9:].T + b)
    gamma = torch.stack([log_gamma[..., c // (9 // width)].exp() for c in range(9)], dim=-1)
    want = (1 - gate) * h + gate * z + gamma * h
    got = mdi.integrate(h, z, log_gamma)
    assert rel_err(got, want) < 1e-12
    probe = torch.randn_like(want)
    params = [h, z, k, *mdi.parameters()]
    grads = torch.autograd.grad((got * probe).sum(), params, retain_graph=True)
    ref = torch.autograd.grad((want * probe).sum(), params)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) < 1e-10


def test_gated_integration_is_off_by_default_and_starts_half_open():
    assert MDI(8, 4).integration is None
    mdi = MDI(8, 4, integration=True)
    assert mdi.integration.bias.abs().max() == 0 and mdi.integration.weight.std() < 0.05
    with pytest.raises(ValueError, match="divide d_model"):
        MDI(8, 4, width=3, integration=True)

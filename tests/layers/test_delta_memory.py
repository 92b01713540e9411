"""The ``delta`` memory: a delta-rule matrix per head as the block's long-term memory."""

import pytest
import torch
import torch.nn.functional as F

import mmrec
from mmrec.layers.delta_memory import DeltaMemory
from mmrec.ops.delta_rule import naive_delta_rule
from tests.helpers import rel_err


def memory(dtype=torch.float64, **config):
    """Odd sizes: d_model 15 in 3 heads of 5, delta chunks of 4."""
    config = {"chunk": 4, "conv": 3, **config}
    return DeltaMemory(DeltaMemory.Config(**config), d_model=15, n_heads=3).to(dtype)


def reference(layer: DeltaMemory, q, k, v):
    """conv on [q | k] → SiLU → β, log α from each head's key → unit norm → the delta rule
    token by token → RMSNorm per head, written out from the definition."""
    batch, length, d = q.shape
    heads, e = layer.heads, layer.head_dim
    qk = torch.cat([q, k], -1)
    taps = layer.conv.weight
    padded = F.pad(qk, [0, 0, taps.shape[0] - 1, 0])
    qk = sum(taps[j] * padded[:, j : j + length] for j in range(taps.shape[0]))
    q, k = F.silu(qk).view(batch, length, 2, heads, e).unbind(2)
    beta = torch.sigmoid((k * layer.gate_weight[0]).sum(-1) + layer.gate_bias[0])
    log_alpha = -F.softplus((k * layer.gate_weight[1]).sum(-1) + layer.gate_bias[1])
    o, matrix = naive_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v.view(batch, length, heads, e), beta, log_alpha)
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + torch.finfo(o.dtype).eps) * layer.out_norm
    return o.reshape(batch, length, d), matrix


@pytest.mark.parametrize("length", [1, 9, 13])
def test_equals_the_token_loop_float64_with_gradients(length):
    torch.manual_seed(length)
    layer = memory()
    with torch.no_grad():
        layer.out_norm.uniform_(0.5, 1.5)
    q, k, v = (torch.randn(2, length, 15, dtype=torch.float64, requires_grad=True) for _ in range(3))
    context, state = layer(q, k, v, chunk_size=7)
    expected, matrix = reference(layer, q, k, v)
    assert rel_err(context, expected) < 1e-10 and rel_err(state["matrix"], matrix) < 1e-10
    grad = torch.randn_like(context)
    got = torch.autograd.grad(context, [q, k, v, *layer.parameters()], grad)
    want = torch.autograd.grad(expected, [q, k, v, *layer.parameters()], grad)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-9


def test_gradcheck_through_the_chunked_path():
    torch.manual_seed(0)
    layer = memory(conv=None)
    q, k, v = (torch.randn(1, 6, 15, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: layer(q, k, v, chunk_size=7)[0], (q, k, v))


def test_decays_start_spread_over_the_heads():
    layer = memory(decay_init=(0.9, 0.999))
    alpha = torch.exp(-F.softplus(layer.gate_bias[1]))  # the decay of a key orthogonal to the gate weights
    assert alpha[0].item() == pytest.approx(0.999) and alpha[-1].item() == pytest.approx(0.9)
    assert (alpha.diff() < 0).all()


def test_config_is_checked_against_the_model():
    with pytest.raises(ValueError, match="memory.heads"):
        mmrec.build({"name": "bad", "model": {"arch": "mmrec", "vocab_size": 32, "d_model": 16, "n_layers": 1,
                                               "n_heads": 2, "ffn_dim": 32, "memory": {"kind": "delta", "heads": 3}}})
    with pytest.raises(ValueError, match="0 < low <= high < 1"):
        DeltaMemory.Config(decay_init=(0.99, 0.9))


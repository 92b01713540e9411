import torch

from mmrec.ops.gated_rnn import gated_rnn_reference
from tests.helpers import rel_err


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

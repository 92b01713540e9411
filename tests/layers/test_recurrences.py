import torch

from mmrec.layers.exact_recurrence import ExactRecurrence
from mmrec.layers.parallel_recurrence import ParallelRecurrence
from tests.helpers import rel_err


def test_parallel_recurrence_matches_step_loop_float64():
    recurrence = ParallelRecurrence(ParallelRecurrence.Config(), d_model=7, n_heads=1)
    z, gate = torch.randn(2, 29, 7, dtype=torch.float64), torch.randn(2, 29, 7, dtype=torch.float64)
    log_decay = torch.empty(2, 29, 7, dtype=torch.float64).uniform_(-2, -0.001)
    h0 = torch.randn(2, 7, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (z, log_decay, gate, h0)]
    h, h_last = recurrence(*args)
    ref_args = [t.clone().requires_grad_() for t in (z, log_decay, gate, h0)]
    state, states = ref_args[3], []
    for t in range(29):
        state = ref_args[1][:, t].exp() * state + torch.sigmoid(ref_args[2][:, t]) * ref_args[0][:, t]
        states.append(state)
    ref = torch.stack(states, 1)
    assert rel_err(h, ref) < 1e-10 and rel_err(h_last, state) < 1e-10
    probe = torch.randn_like(ref)
    (h * probe).sum().backward()
    (ref * probe).sum().backward()
    for got, want in zip(args, ref_args):
        assert rel_err(got.grad, want.grad) < 1e-10


def test_exact_recurrence_uses_block_diagonal_gate():
    recurrence = ExactRecurrence(ExactRecurrence.Config(), d_model=6, n_heads=2).double()
    assert recurrence.gate_weight.shape == (2, 3, 3)
    z = torch.randn(1, 5, 6, dtype=torch.float64)
    log_decay = torch.full((1, 5, 6), -0.1, dtype=torch.float64)
    h, _ = recurrence(z, log_decay)
    # head 0's state never depends on head 1's inputs
    z2 = z.clone()
    z2[..., 3:] = torch.randn(1, 5, 3, dtype=torch.float64)
    h2, _ = recurrence(z2, log_decay)
    torch.testing.assert_close(h[..., :3], h2[..., :3])
    assert not torch.allclose(h[..., 3:], h2[..., 3:])

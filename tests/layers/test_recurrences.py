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


def test_parallel_recurrence_bfloat16_stores_h_narrow_and_carries_a_float32_state():
    torch.manual_seed(0)
    recurrence = ParallelRecurrence(ParallelRecurrence.Config(), d_model=9, n_heads=1)
    z, gate = torch.randn(2, 301, 9).bfloat16(), torch.randn(2, 301, 9).bfloat16()
    log_decay = torch.empty(2, 301, 9).uniform_(-0.2, -1e-4).bfloat16()  # time constants up to 10^4
    h0 = torch.randn(2, 9)
    h, h_last = recurrence(z, log_decay, gate, h0)
    assert h.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    # the float64 loop on the same (rounded) inputs
    inputs = (torch.sigmoid(gate) * z).double()  # the gated input is formed in bf16
    state, states = h0.double(), []
    for t in range(301):
        state = log_decay[:, t].double().exp() * state + inputs[:, t]
        states.append(state)
    assert rel_err(h, torch.stack(states, 1)) < 1e-2
    assert rel_err(h_last, state) < 1e-5  # a bf16 h_last would be off by about 2e-3
    # pieces carried through h_last give one pass
    first, mid = recurrence(z[:, :100], log_decay[:, :100], gate[:, :100], h0)
    second, last = recurrence(z[:, 100:], log_decay[:, 100:], gate[:, 100:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), h)
    torch.testing.assert_close(last, h_last)


def test_bfloat16_log_decay_keeps_the_state_error_small():
    """MDI's bf16 ``log γ`` against its float32 one, through the scan, over 2000 steps of
    slow decays: the state moves by much less than bf16's own rounding of it."""
    from mmrec.layers.mdi import MDI

    torch.manual_seed(1)
    mdi = MDI(16, 8, decay_init=(0.99, 0.9995)).bfloat16()
    recurrence = ParallelRecurrence(ParallelRecurrence.Config(), d_model=16, n_heads=1)
    z, k, gate = torch.randn(1, 2000, 16).bfloat16(), torch.randn(1, 2000, 8).bfloat16(), torch.randn(1, 2000, 16).bfloat16()
    _, narrow = recurrence(z, mdi(z, k), gate)
    _, wide = recurrence(z, mdi(z, k, torch.float32), gate)
    assert 0 < rel_err(narrow, wide) < 2e-3, rel_err(narrow, wide)

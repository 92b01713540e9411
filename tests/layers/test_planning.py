import torch

from mmrec.layers.planning import Planning
from tests.helpers import rel_err


def test_planning_loss_value_and_gradient_isolation():
    planning = Planning(Planning.Config(lambda_p=0.3), d_model=7).double()
    state = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    block_input = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    loss = planning(state, block_input)
    ref = 0.3 * ((state[:, :-1] @ planning.predict.weight.T - block_input[:, 1:]) ** 2).mean()
    torch.testing.assert_close(loss, ref)
    grad_state, grad_input = torch.autograd.grad(loss, (state, block_input), allow_unused=True)
    assert grad_state.abs().sum() > 0
    assert grad_input is None  # the target branch is stop-gradient


def test_planning_bfloat16_saves_only_bfloat16_and_matches_float64():
    torch.manual_seed(0)
    planning64 = Planning(Planning.Config(lambda_p=0.3), d_model=11).double()
    planning = Planning(Planning.Config(lambda_p=0.3), d_model=11).bfloat16()
    planning.load_state_dict(planning64.state_dict())
    state = torch.randn(2, 37, 11).bfloat16().requires_grad_()
    block_input = torch.randn(2, 37, 11).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = planning(state, block_input)
    assert loss.dtype == torch.float32  # the mean accumulates in float32
    assert saved and all(t.dtype == torch.bfloat16 for t in saved), [t.dtype for t in saved]
    state64 = state.detach().double().requires_grad_()
    ref = planning64(state64, block_input.double())
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    got = torch.autograd.grad(loss, (state, planning.predict.weight))
    want = torch.autograd.grad(ref, (state64, planning64.predict.weight))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-2
    assert got[0][:, -1].abs().max() == 0  # the last position predicts nothing


def test_planning_loss_is_zero_for_one_token():
    planning = Planning(Planning.Config(), d_model=5)
    state = torch.randn(3, 1, 5, requires_grad=True)
    loss = planning(state, torch.randn(3, 1, 5))
    assert loss.item() == 0
    loss.backward()
    assert state.grad.abs().max() == 0

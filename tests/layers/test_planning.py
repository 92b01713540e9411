import torch

from mmrec.layers.planning import Planning


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

"""UBÖO planning auxiliary loss: predict the next position's block input from the state.

The target (the next token's normalised block input) is detached, so the aux loss
trains the predictor and the state that feeds it, never the target branch (gradient
isolation). The block returns ``lambda_p * mean squared error``; the model averages it
over layers.

Only tensors in the activations' dtype are kept for backward: the predictor runs on the
whole state (a slice ``state[:, :-1]`` would be copied for the matmul's backward) and the
prediction is sliced after it, and the squared error is averaged in float32 by
``MeanSquaredError``, which keeps the bf16 prediction and target rather than the two
float32 copies that ``mse_loss(prediction.float(), target.float())`` keeps.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mmrec.ops import accumulation_dtype


class Planning(nn.Module):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lambda_p: float = Field(0.1, ge=0, description="weight of the planning loss")

    def __init__(self, config: Config, d_model: int, bias: bool = False):
        super().__init__()
        self.lambda_p = config.lambda_p
        self.predict = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, state: Tensor, block_input: Tensor) -> Tensor:
        """``state``, ``block_input``: ``[B, T, D]`` -> scalar loss (0 when T == 1)."""
        prediction = self.predict(state)[:, :-1]  # the last position has nothing to predict
        target = block_input[:, 1:].detach()
        return self.lambda_p * MeanSquaredError.apply(prediction, target)


class MeanSquaredError(torch.autograd.Function):
    """``mean((x - y)^2)`` accumulated in float32 (float64 for float64), 0 for empty inputs;
    saves ``x`` and ``y`` in their own dtype and recomputes the difference in backward.
    ``y`` gets no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(x, y)
        acc = accumulation_dtype(x.dtype)
        return (x.to(acc) - y.to(acc)).square().sum() / max(x.numel(), 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, y = ctx.saved_tensors
        acc = accumulation_dtype(x.dtype)
        return ((x.to(acc) - y.to(acc)) * (grad * 2 / max(x.numel(), 1))).to(x.dtype), None

"""UBÖO planning auxiliary loss: predict the next position's block input from the state.

The target (the next token's normalised block input) is detached, so the aux loss
trains the predictor and the state that feeds it, never the target branch (gradient
isolation). The block returns ``lambda_p * mean squared error``; the model averages it
over layers.
"""

from __future__ import annotations

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
        prediction = self.predict(state[:, :-1])
        target = block_input[:, 1:].detach()
        acc = accumulation_dtype(prediction.dtype)
        return self.lambda_p * nn.functional.mse_loss(prediction.to(acc), target.to(acc))

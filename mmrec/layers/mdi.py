"""MDI (memory decay / integration): the per-token, per-channel decay of the recurrence.

``γ_t = σ(W_γ z_t + b_γ) ⊙ σ(W_c k_t + b_c)``: the candidate ``z`` sets the decay and the
memory key ``k`` modulates it by context. Both biases start at ``logit(sqrt(decay_init))``
and the weights small, so ``γ ≈ decay_init`` at initialisation. Returned as ``log γ``
(float32), which is exact where ``γ`` itself would round to 1 or 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmrec.ops import accumulation_dtype


class MDI(nn.Module):
    def __init__(self, d_model: int, d_context: int, decay_init: float = 0.99, init_std: float = 0.02):
        super().__init__()
        if not 0.0 < decay_init < 1.0:
            raise ValueError(f"decay_init must be in (0, 1), got {decay_init}")
        self.decay = nn.Linear(d_model, d_model, bias=False)  # W_γ
        self.context = nn.Linear(d_context, d_model, bias=False)  # W_c
        half = math.sqrt(decay_init)
        self.decay_bias = nn.Parameter(torch.full((d_model,), math.log(half / (1 - half))))
        self.context_bias = nn.Parameter(torch.full((d_model,), math.log(half / (1 - half))))
        self.init_std = init_std

    def init_weights(self) -> None:
        # small weights: the decay starts near decay_init whatever the token
        nn.init.normal_(self.decay.weight, std=self.init_std * 0.1)
        nn.init.normal_(self.context.weight, std=self.init_std * 0.1)

    def forward(self, z: Tensor, k: Tensor) -> Tensor:
        """``z``: ``[B, T, d_model]``, ``k``: ``[B, T, d_context]`` -> ``log γ`` ``[B, T, d_model]``."""
        decay_logit = self.decay(z) + self.decay_bias
        context_logit = self.context(k) + self.context_bias
        acc = accumulation_dtype(z.dtype)
        return nn.functional.logsigmoid(decay_logit.to(acc)) + nn.functional.logsigmoid(context_logit.to(acc))

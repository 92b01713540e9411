"""The ``exact`` gated recurrence, the seeds' formula ``h_t = z_t ⊙ σ(W_g h_{t-1}) + γ_t ⊙ h_{t-1}``.

``W_g`` is block-diagonal per head. Nonlinear in the state, so it runs sequentially:
the op ``mmrec::gated_rnn`` (a fused Triton kernel on CUDA, a step loop on CPU).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mmrec.contracts import Recurrence
from mmrec.ops.gated_rnn import gated_rnn


class ExactRecurrence(Recurrence):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["exact"] = "exact"

    needs_input_gate = False  # the gate reads the state through W_g

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        head_dim = d_model // n_heads
        self.gate_weight = nn.Parameter(torch.empty(n_heads, head_dim, head_dim))  # W_g, one block per head
        self.init_std = init_std
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.gate_weight, std=self.init_std)

    def forward(self, z: Tensor, log_decay: Tensor, gate: Tensor | None = None, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return gated_rnn(z, log_decay, self.gate_weight, h0)

"""SwiGLU feed-forward: ``W_down(silu(W_gate x) * W_up x)``."""

from __future__ import annotations

from torch import Tensor, nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)  # both input projections in one matmul
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(nn.functional.silu(gate) * up))

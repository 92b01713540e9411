"""The ``complex`` recurrence: ``h_t = γ_t e^{iθ} h_{t-1} + σ(g_t) ⊙ z_t`` with complex ``h``.

Each channel's state rotates by a learned angle ``θ`` per step while it decays by ``γ_t``
(from the block's MDI), so a channel can hold an oscillation instead of only an
exponential trace (as in LRU-style recurrences). The block sees ``Re h``.

No new kernel is needed: with ``g_t = h_t e^{-iθt}`` the recurrence becomes
``g_t = γ_t g_{t-1} + b_t e^{-iθt}`` — real decays on the real and imaginary parts — so
it runs on mmrec's ``linear_scan`` op, in parallel over time. Phases are computed in
float64 and reduced modulo 2π so long sequences keep their precision.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mmrec.contracts import Recurrence
from mmrec.ops import linear_scan

__all__ = ["ComplexRecurrence"]


class ComplexRecurrence(Recurrence):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["complex"] = "complex"
        max_period: float = Field(1000.0, gt=1, description="longest rotation period at initialisation, in tokens")

    needs_input_gate = True

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.max_period = config.max_period
        self.angle = nn.Parameter(torch.empty(d_model))  # θ per channel, radians per token
        self.init_weights()

    def init_weights(self) -> None:
        # periods spread geometrically from 2 tokens to max_period, as rotary embeddings do
        periods = torch.logspace(math.log10(2.0), math.log10(self.max_period), self.angle.numel())
        with torch.no_grad():
            self.angle.copy_(2 * math.pi / periods)

    def forward(self, z: Tensor, log_decay: Tensor, gate: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``h0`` / the returned last state: ``[B, 2 * d]``, the real then the imaginary part."""
        acc = log_decay.dtype
        steps = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=torch.float64)
        phase = torch.remainder(steps[:, None] * self.angle.double(), 2 * math.pi).to(acc)  # θt mod 2π, [T, d]
        cos, sin = phase.cos(), phase.sin()
        inputs = torch.sigmoid(gate.to(acc)) * z.to(acc)
        decay = log_decay.exp()
        g, _ = linear_scan(torch.cat([decay, decay], -1), torch.cat([inputs * cos, -inputs * sin], -1), h0)
        g_re, g_im = g.chunk(2, dim=-1)
        h_re, h_im = g_re * cos - g_im * sin, g_re * sin + g_im * cos
        return h_re, torch.cat([h_re[:, -1], h_im[:, -1]], dim=-1)

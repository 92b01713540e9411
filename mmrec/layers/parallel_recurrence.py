"""The ``parallel`` gated recurrence: ``h_t = γ_t ⊙ h_{t-1} + σ(g_t) ⊙ z_t``.

The input gate ``g`` reads the block input, not the state, so the recurrence is linear
in ``h`` and the scan op solves it in parallel over time. The state is accumulated in
float32, but the states ``h`` are stored in the activations' dtype (the block casts them
to it anyway; the last state, carried to the next call, stays float32). The gated input
``σ(g) ⊙ z`` is in the activations' dtype too, and the decay enters the scan as ``log γ``
in that dtype (MDI says why that is precise enough): the scan forms ``γ`` in float32
itself, so nothing float32 is stored for backward.

A document start (``resets``) sets ``γ = 0`` there (``log γ = −∞``): the state begins
again from that token's input, exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mmrec.contracts import Recurrence
from mmrec.ops import linear_scan


class ParallelRecurrence(Recurrence):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["parallel"] = "parallel"

    needs_input_gate = True  # the block projects g from its input for this variant
    narrow_decay = True  # takes log γ in the activations' dtype (the scan exponentiates in float32)
    supports_resets = True

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()

    def forward(self, z: Tensor, log_decay: Tensor, gate: Tensor | None, h0: Tensor | None = None,
                resets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``z``, ``gate``: ``[B, T, D]``; ``log_decay``: ``log γ`` ``[B, T, D]``; ``h0``: ``[B, D]``;
        ``resets``: ``[B, T]`` bool, document starts.

        Returns ``h`` ``[B, T, D]`` in ``z``'s dtype and the last state ``[B, D]`` in the
        accumulation dtype (float32 for bf16)."""
        inputs = torch.sigmoid(gate) * z
        if resets is not None:
            log_decay = log_decay.masked_fill(resets.unsqueeze(-1), float("-inf"))
        return linear_scan(log_decay, inputs, h0, log_space=True, out_dtype=z.dtype)

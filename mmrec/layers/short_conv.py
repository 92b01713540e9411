"""Short causal convolution: each channel mixes its own last few tokens, then SiLU.

``y_t = silu(Σ_{j<K} w_j ⊙ x_{t-j})``, depthwise over time. A per-channel linear
recurrence only integrates what each token projects; with this in front of it, the
integrated features are small n-grams (for characters, the letters just before), which
attention gets for free. Mamba, GLA and DeltaNet put one before their recurrences.

The last ``K - 1`` inputs are the state a later call continues from, so a sequence fed
in pieces gives what one pass gives.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class ShortConv(nn.Module):
    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"kernel_size must be at least 2 (1 is a per-token scale), got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))  # [D, 1, K], as a depthwise Conv1d's
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv1d's default

    def forward(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x``: ``[B, T, D]``; ``cache``: the previous call's last ``K - 1`` inputs
        ``[B, K-1, D]`` (zeros before the start). Returns ``y`` ``[B, T, D]`` and the next cache."""
        if cache is None:
            cache = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[2])
        padded = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, K-1+T, D]
        y = nn.functional.conv1d(rearrange(padded, "b t d -> b d t"), self.weight.to(x.dtype), groups=x.shape[2])
        # a copy: a view would keep the whole input alive in the state
        return nn.functional.silu(rearrange(y, "b d t -> b t d")), padded[:, x.shape[1]:].clone()

"""Short causal convolution: each channel mixes its own last few tokens.

``y_t = Σ_{j<K} w_j ⊙ x_{t-j}``, depthwise over time. A per-channel linear recurrence
only integrates what each token projects; with this in front of it, the integrated
features are small n-grams (for characters, the letters just before), which attention
gets for free. Mamba, GLA and DeltaNet put one before their recurrences (with a SiLU
after it; here it stays linear, so that in the MM-Rec block the input gate ``σ(g_t)``,
read from token ``t``, multiplies features of the tokens before it).

``init="identity"`` starts as the identity (the block starts as it would without the
convolution); ``"random"`` as ``nn.Conv1d`` does, mixing from the first step.

The last ``K - 1`` inputs are the state a later call continues from, so a sequence fed
in pieces gives what one pass gives.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class ShortConv(nn.Module):
    def __init__(self, dim: int, kernel_size: int, init: str = "identity"):
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"kernel_size must be at least 2 (1 is a per-token scale), got {kernel_size}")
        if init not in ("identity", "random"):
            raise ValueError(f"init must be 'identity' or 'random', got {init!r}")
        self.kernel_size, self.init = kernel_size, init
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))  # [D, 1, K], as a depthwise Conv1d's
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.init == "random":
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv1d's default
        else:
            nn.init.zeros_(self.weight)
            self.weight[:, 0, -1] = 1.0  # the tap of the token itself

    def forward(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x``: ``[B, T, D]``; ``cache``: the previous call's last ``K - 1`` inputs
        ``[B, K-1, D]`` (zeros before the start). Returns ``y`` ``[B, T, D]`` and the next cache."""
        if cache is None:
            cache = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[2])
        padded = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, K-1+T, D]
        y = nn.functional.conv1d(rearrange(padded, "b t d -> b d t"), self.weight.to(x.dtype), groups=x.shape[2])
        # a copy: a view would keep the whole input alive in the state
        return rearrange(y, "b d t -> b t d"), padded[:, x.shape[1]:].clone()

"""Short causal convolution: each channel mixes its own last few tokens.

``y_t = Σ_{j<K} w_j ⊙ x_{t-j}``, depthwise over time. A per-channel linear recurrence
only integrates what each token projects; with this in front of it, the integrated
features are small n-grams (for characters, the letters just before), which attention
gets for free. Mamba, GLA and DeltaNet put one before their recurrences (with a SiLU
after it; here it stays linear, so that in the MM-Rec block the input gate ``σ(g_t)``,
read from token ``t``, multiplies features of the tokens before it).

It is written as K shifted multiply-adds rather than ``conv1d``: for K of 2 to 4 that is
one elementwise kernel once compiled, and it keeps convolutions out of the model's graph,
where a ``conv1d`` gave wrong gradients in the compiled bf16 CUDA model
(docs/notes/benchmark-history.md). tests/test_model_cuda.py checks this form's compiled
CUDA gradients against the eager CPU model.

``init="identity"`` starts as the identity (the block starts as it would without the
convolution); ``"random"`` as ``nn.Conv1d`` does, mixing from the first step.

The last ``K - 1`` inputs are the state a later call continues from, so a sequence fed
in pieces gives what one pass gives. With document ``resets`` a tap that would reach back
across a document start reads zero, as at the start of a sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmrec.documents import document_ids


class ShortConv(nn.Module):
    def __init__(self, dim: int, kernel_size: int, init: str = "identity"):
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"kernel_size must be at least 2 (1 is a per-token scale), got {kernel_size}")
        if init not in ("identity", "random"):
            raise ValueError(f"init must be 'identity' or 'random', got {init!r}")
        self.kernel_size, self.init = kernel_size, init
        # [K, D]: row j weighs the input j - (K - 1) tokens away; the last row, the token itself
        self.weight = nn.Parameter(torch.empty(kernel_size, dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.init == "random":
            bound = 1 / math.sqrt(self.kernel_size)  # nn.Conv1d's default for a depthwise kernel
            nn.init.uniform_(self.weight, -bound, bound)
        else:
            nn.init.zeros_(self.weight)
            self.weight[-1] = 1.0

    def forward(self, x: Tensor, cache: Tensor | None = None, resets: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x``: ``[B, T, D]``; ``cache``: the previous call's last ``K - 1`` inputs
        ``[B, K-1, D]`` (zeros before the start); ``resets``: ``[B, T]`` bool, document starts.
        Returns ``y`` ``[B, T, D]`` and the next cache."""
        batch, length, _ = x.shape
        if cache is None:
            cache = x.new_zeros(batch, self.kernel_size - 1, x.shape[2])
        padded = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, K-1+T, D]
        weight = self.weight.to(x.dtype)
        if resets is None:
            y = sum(weight[j] * padded[:, j : j + length] for j in range(self.kernel_size))
            return y, padded[:, length:].clone()  # a copy: a view would keep the whole input alive
        # each input's document (the cache's: 0, the document the call continues); a tap
        # reads an input only from its own token's document
        ids = document_ids(resets)  # [B, T]
        padded_ids = torch.cat([ids.new_zeros(batch, self.kernel_size - 1), ids], dim=1)
        same = [(padded_ids[:, j : j + length] == ids).unsqueeze(-1) for j in range(self.kernel_size)]
        y = sum(weight[j] * padded[:, j : j + length] * same[j] for j in range(self.kernel_size))
        # the next call continues the last document: inputs of earlier ones leave the cache
        carried = (padded_ids[:, length:] == ids[:, -1:]).unsqueeze(-1)
        return y, (padded[:, length:] * carried).clone()

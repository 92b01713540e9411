"""RMSNorm: ``x / rms(x) * weight``, computed in float32 for low-precision inputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmrec.ops import accumulation_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # float32 statistics keep bf16 activations from losing the normalisation's precision
        acc = accumulation_dtype(x.dtype)
        out = nn.functional.rms_norm(x.to(acc), (x.shape[-1],), eps=self.eps)
        return out.to(x.dtype) * self.weight.to(x.dtype)

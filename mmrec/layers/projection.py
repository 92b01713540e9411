"""HEM: every per-token projection of a block from one matmul, or as separate linears.

``FusedProjection(d_in, {"q": 64, "z": 128, ...}, fused=True)`` returns a dict of
``[..., width]`` tensors. ``fused=False`` holds one ``nn.Linear`` per output; the two are
the same function once weights are converted with :func:`fuse_state_dict` /
:func:`split_state_dict`, so benchmarks compare them honestly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FusedProjection(nn.Module):
    def __init__(self, d_in: int, widths: dict[str, int], fused: bool = True, bias: bool = False):
        super().__init__()
        self.widths = dict(widths)
        self.fused = fused
        if fused:
            self.proj = nn.Linear(d_in, sum(self.widths.values()), bias=bias)
        else:
            self.projs = nn.ModuleDict({name: nn.Linear(d_in, width, bias=bias) for name, width in self.widths.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.fused:
            parts = self.proj(x).split(list(self.widths.values()), dim=-1)
            return dict(zip(self.widths, parts))
        return {name: proj(x) for name, proj in self.projs.items()}


def fuse_state_dict(state: dict[str, Tensor], widths: dict[str, int], prefix: str = "") -> dict[str, Tensor]:
    """Turn a ``fused=False`` projection's weights (under ``prefix``) into ``fused=True`` ones."""
    out = {k: v for k, v in state.items() if not k.startswith(prefix + "projs.")}
    for kind in ("weight", "bias"):
        keys = [f"{prefix}projs.{name}.{kind}" for name in widths]
        if all(k in state for k in keys):
            out[f"{prefix}proj.{kind}"] = torch.cat([state[k] for k in keys], dim=0)
    return out


def split_state_dict(state: dict[str, Tensor], widths: dict[str, int], prefix: str = "") -> dict[str, Tensor]:
    """Turn a ``fused=True`` projection's weights (under ``prefix``) into ``fused=False`` ones."""
    out = {k: v for k, v in state.items() if not k.startswith(prefix + "proj.")}
    for kind in ("weight", "bias"):
        key = f"{prefix}proj.{kind}"
        if key in state:
            for name, part in zip(widths, state[key].split(list(widths.values()), dim=0)):
                out[f"{prefix}projs.{name}.{kind}"] = part
    return out

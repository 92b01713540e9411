"""The ``none`` memory: no long-term memory, for the layers of a hybrid stack that recall by
their recurrence.

A ``delta`` recurrence already keeps associations in its matrix state; reading an ``hds``
memory beside it costs that layer its largest part (the write, the update over chunks and
the read's attention) and the ``q`` and ``v`` projections. With ``none`` the block projects
only the ``k`` that MDI reads for its context gate (``key_dim`` wide), returns no context
(the block adds nothing to the state), and carries no memory state. Pick it per layer with ``model.layer_overrides``,
e.g. ``{"layers": [0, 4], "recurrence": {"kind": "delta"}, "memory": {"kind": "none"}}``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import Tensor

from mmrec.contracts import Memory


class NoMemory(Memory):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["none"] = "none"
        key_dim: PositiveInt = Field(64, description="width of the k the block projects for MDI's context gate")

    supports_resets = True  # nothing kept, so nothing to forget

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.d_model = d_model
        self.key_dim = config.key_dim

    def projection_widths(self, d_model: int) -> dict[str, int]:
        """Only ``k``, which MDI reads; no ``q`` or ``v``."""
        return {"k": self.key_dim}

    def forward(self, q: Tensor | None, k: Tensor, v: Tensor | None, chunk_size: int, state: dict | None = None,
                dropout: float = 0.0, resets: Tensor | None = None) -> tuple[None, dict]:
        """No context and an empty state."""
        return None, {}

    # static decoding: nothing to keep

    def static_state(self, state: dict, batch: int, chunk_size: int, dtype: torch.dtype | None = None) -> dict:
        return {}

    def step(self, q: Tensor | None, k: Tensor, v: Tensor | None, chunk_size: int, static: dict,
             position: Tensor) -> tuple[None, dict]:
        return None, static

    def complete_chunk(self, static: dict) -> None:
        pass

    def eager_state(self, static: dict, pending: int) -> dict:
        return {}

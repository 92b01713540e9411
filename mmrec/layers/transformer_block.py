"""A pre-norm Transformer block (causal attention + SwiGLU): the baseline architecture."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from mmrec.config import ModelConfigBase
from mmrec.contracts import Block
from mmrec.layers.attention import CausalSelfAttention, static_cache
from mmrec.layers.ffn import SwiGLU
from mmrec.layers.norm import RMSNorm


class TransformerBlock(Block):
    class Config(ModelConfigBase):
        """A Llama-style Transformer: the baseline MM-Rec is measured against."""

        arch: Literal["transformer"] = "transformer"
        rope_base: float = Field(10000.0, gt=0)

        @model_validator(mode="after")
        def _rotary_needs_even_heads(self):
            if self.head_dim % 2:
                raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even: RoPE rotates pairs of channels")
            return self

    def __init__(self, config: Config, layer: int = 0):
        super().__init__()
        self.d_model = config.d_model
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, config.rope_base, config.bias, config.dropout)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.ffn_dim, config.bias, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.attn.out, self.ffn.down]

    # static decoding (mmrec.decode): the KV cache in a buffer of a fixed number of entries,
    # written at the position and attended over in full with the entries past it masked
    chunk_size = None  # no step of this block needs the host to act after it
    CACHE_ROUND = 256  # the static cache holds a multiple of this many entries

    def supports_static(self) -> bool:
        return True

    def static_state(self, layer: dict, *, batch: int, position: int, max_length: int | None = None,
                     kv_splits: int = 0, donate: bool = False) -> dict:
        """The cache ``layer`` (``k``, ``v`` ``[B, H, position, E]``) in a buffer with room for
        ``max_length`` tokens (required), rounded up to ``CACHE_ROUND``; ``donate``: the
        cache's own tensors, if they have that room already."""
        if max_length is None:
            raise ValueError("a Transformer's static KV cache needs max_length")
        needed, room = max(max_length, position + 1), layer["k"].shape[2]
        donate = donate and room >= needed
        capacity = room if donate else -(-needed // self.CACHE_ROUND) * self.CACHE_ROUND
        return static_cache(layer, position, capacity, kv_splits, donate)

    @staticmethod
    def static_capacity(static: dict) -> int | None:
        """How many tokens the static cache holds."""
        return static["k"].shape[2]

    @staticmethod
    def eager_state(static: dict, length: int) -> dict:
        """The eager cache equal to ``static`` after ``length`` tokens (a copy)."""
        eager = {name: static[name][:, :, :length].clone() for name in ("k", "v")}
        if "doc" in static:
            eager["doc"] = static["doc"][:, :length].clone()
        return eager

    def mixing_flops(self, length: int) -> float:
        """Causal attention's q·k and p·v per token, forward and backward: 12 x (length / 2) x d."""
        return 6 * length * self.d_model

    def supports_resets(self) -> bool:
        """Attention masked to each token's document (see :class:`CausalSelfAttention`)."""
        return True

    def forward(self, x: Tensor, state: dict | None = None, return_aux_loss: bool = False, position: int | Tensor = 0,
                *, resets: Tensor | None = None) -> tuple[Tensor, dict, None]:
        """``x``: ``[B, T, d_model]``; ``state`` is the KV cache of the ``position`` earlier
        tokens; ``resets`` ``[B, T]`` bool: document starts."""
        attended, cache = self.attn(self.attn_norm(x), state, position, resets)
        x = x + self.dropout(attended)
        x = x + self.ffn(self.ffn_norm(x))
        return x, cache, None

"""The ``delta`` memory: a long-term memory that stores key→value associations.

The ``hds`` memory keeps pooled summaries of each chunk in its slots, so the pairs inside
a chunk are averaged before they are stored and a later query cannot look one up. Here
the memory is a matrix per head, written token by token with the gated delta rule
(DeltaNet, Gated DeltaNet; Titans writes its memory the same way) and read by the queries::

    M_t = α_t (I − β_t k_t k_tᵀ) M_{t−1} + β_t k_t v_tᵀ,      context_t = RMSNorm(M_tᵀ q_t)

A write first removes what the memory returns for ``k_t``, so a key seen again replaces
its value. The block's own ``q``, ``k``, ``v`` (its fused projection) are the memory's:
``key_dim = d_model``, split into ``heads`` heads. ``q`` and ``k`` pass through a short
causal convolution (``conv`` taps), which lets the write at a value's token see the key
just before it, then SiLU and unit norm. ``β_t`` and ``α_t`` are read from ``k_t`` per head
(one weight vector and bias each); the decays start spread over ``decay_init`` across the
heads, long time constants by default: this is the block's long-term store, beside a
short-term recurrence. The output is normalised per head (a learned scale), since it
joins the normalised recurrent state before ``W_o``.

It is causal per token (stricter than the chunk-level contract) and has no chunk in
progress: the state is the matrix ``[B, H, d_h, d_h]`` (accumulation dtype) and the
convolution's last inputs, the same size at any length. Training runs
:func:`mmrec.ops.delta_rule.chunk_delta_rule` (chunks of ``chunk`` tokens); one token runs
one recurrent step, which is also the static decode step.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import Tensor, nn

from mmrec.contracts import Memory
from mmrec.layers.delta_recurrence import conv_silu_heads
from mmrec.layers.mdi import spread_decays
from mmrec.layers.short_conv import ShortConv
from mmrec.ops.delta_rule import check_chunk, chunk_delta_rule_flops, delta_rule


class DeltaMemory(Memory):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["delta"] = "delta"
        heads: PositiveInt | None = Field(None, description="heads of the memory matrix; null: the model's n_heads")
        chunk: PositiveInt = Field(64, description="tokens per chunk of the chunked delta rule")
        conv: int | None = Field(4, ge=2, description="taps of the causal convolution on q and k; null: none")
        decay_init: tuple[float, float] = Field(
            (0.99, 0.9999), description="initial decays α, spread over the heads from the first to the second"
        )

        @field_validator("decay_init")
        @classmethod
        def _decays_in_range(cls, value):
            if not 0 < value[0] <= value[1] < 1:
                raise ValueError("must be [low, high] with 0 < low <= high < 1")
            return value

        def check_model(self, model) -> None:
            heads = self.heads or model.n_heads
            if model.d_model % heads:
                raise ValueError(f"memory.heads ({heads}) must divide d_model ({model.d_model})")
            check_chunk(self.chunk, model.d_model // heads, "memory.chunk")

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.heads = config.heads or n_heads
        self.head_dim = d_model // self.heads
        self.key_dim = d_model
        self.chunk = config.chunk
        self.decay_init = config.decay_init
        self.conv = ShortConv(2 * d_model, config.conv, init="random") if config.conv is not None else None
        # β and log α of each head, read from its key: [H, d_h] weights, [H] biases
        self.gate_weight = nn.Parameter(torch.empty(2, self.heads, self.head_dim))
        self.gate_bias = nn.Parameter(torch.empty(2, self.heads))
        self.out_norm = nn.Parameter(torch.empty(self.head_dim))
        self.init_std = init_std
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.gate_weight, std=self.init_std)
        rates = -spread_decays(self.decay_init, self.heads).flip(0).log()  # −log α, the slowest head first
        self.gate_bias[0].zero_()  # β starts at 1/2
        self.gate_bias[1].copy_(rates.expm1().log())  # softplus⁻¹(−log α)
        nn.init.ones_(self.out_norm)

    def flops_per_token(self, length: int, chunk_size: int) -> float:
        return chunk_delta_rule_flops(min(self.chunk, length), self.heads, self.head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, state: dict | None = None,
                dropout: float = 0.0) -> tuple[Tensor, dict]:
        """``q``, ``k``, ``v``: ``[B, T, d]``; ``state``: ``{"matrix", "conv"}`` from the last
        call, or ``None``. ``chunk_size`` (the block's) and ``dropout`` do not apply."""
        batch, length, _ = q.shape
        state = state or {}
        q, k, next_state = conv_silu_heads(self.conv, q, k, self.heads, state)  # [B, T, H, d_h]
        # per head, a dot product with a weight vector (elementwise and a sum: no matmul of a strided view)
        beta, log_alpha = ((k * w).sum(-1) + b for w, b in zip(self.gate_weight.to(k.dtype), self.gate_bias.to(k.dtype)))
        beta, log_alpha = torch.sigmoid(beta), -F.softplus(log_alpha)  # [B, T, H]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        v = v.view(batch, length, self.heads, self.head_dim)
        o, matrix = delta_rule(q, k, v, beta, log_alpha, state.get("matrix"), chunk_size=self.chunk)
        o = F.rms_norm(o.to(k.dtype), (self.head_dim,), self.out_norm.to(k.dtype))
        return o.reshape(batch, length, -1).to(v.dtype), {"matrix": matrix, **next_state}

    # static decoding: the state is fixed-size, so the buffers are copies and a step is the eager step

    def static_state(self, state: dict, batch: int, chunk_size: int, dtype: torch.dtype | None = None) -> dict:
        return {name: value.clone() for name, value in state.items()}

    def step(self, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, static: dict, position: Tensor) -> tuple[Tensor, dict]:
        return self(q, k, v, chunk_size, static)

    def complete_chunk(self, static: dict) -> None:
        """Nothing to do: every token is written as it comes."""

    def eager_state(self, static: dict, pending: int) -> dict:
        return {name: value.clone() for name, value in static.items()}

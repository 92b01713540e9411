"""The ``delta`` recurrence: a matrix state per head written by the gated delta rule.

The ``parallel`` recurrence keeps one number per channel, which cannot hold key→value
associations (multi-query associative recall stays at chance). Here each head ``h`` keeps
``S ∈ R^{d_k×d_h}`` (``d_h = d_model / n_heads``, or its own ``head_dim``; ``d_k = d_h``, or
its own ``key_dim``) and, per token (Gated DeltaNet)::

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,      o_t = S_tᵀ q_t

The write first removes what the state returns for ``k_t``, so a repeated key overwrites
its value instead of piling up. What the block provides, and where:

- ``v_t``: the block's candidate ``z`` (after its optional ``short_conv``), split into heads;
- ``q_t``, ``k_t``: two extra projections ``q_r``, ``k_r`` (width ``heads · d_k`` each), through a
  short causal convolution (``conv`` taps, random start as ``nn.Conv1d``; ``null``: none)
  and SiLU, as DeltaNet does, then L2-normalised per head, which keeps ``I − β k kᵀ`` a
  contraction;
- ``β_t = σ(beta)``: an extra projection of width ``n_heads``; with ``beta_conv``, through a
  causal convolution of its own first, so that how strongly a token writes depends on the
  tokens before it (what a write is worth depends on its context: a key-value pair, or
  filler), as Mamba computes its input-dependent parameters from its convolution's output;
- ``α_t``: MDI's decay with one output per head (``decay_width``), so ``decay_init`` sets
  the heads' initial time constants (a range spreads them over the heads);
- ``g``: an output gate, ``h_t = σ(g_t) ⊙ o_t`` (Gated DeltaNet gates its output the same way).

How many associations the state keeps apart grows with the key width ``d_k``: each write
with a random key erases about ``β / d_k`` of what the others stored, so behind ``n``
unrelated tokens a pair keeps about ``e^{−nβ/d_k}``. ``head_dim`` sets the layer's own
heads, wider than the model's (fewer heads of ``head_dim``: the state, ``d_model · d_k``
numbers, grows with it), for a hybrid whose attention-free layers would otherwise have
narrow heads; ``heads`` sets their count instead (``tiny``'s one head, ``d_model`` wide,
stays one head when a test or benchmark narrows the model). ``key_dim`` widens the keys
and queries alone (state expansion, as HGRN2 and GLA expand theirs): each head's state is
``key_dim × head_dim``, the values keep their width.

``o`` is not scaled by ``d_h^-1/2``: ``q`` has unit norm, so ``o`` already has ``v``'s
scale, and the block normalises ``h`` (``state_norm``) before ``W_o``, which would undo a
constant factor anyway.

Training and prompts run :func:`mmrec.ops.delta_rule.chunk_delta_rule` (chunks of
``chunk`` tokens); a single token runs one recurrent step. The carried state ``h`` is a
dict: ``matrix`` ``[B, H, d_k, d_h]`` in the accumulation dtype (float32 for bf16) and,
with the convolution, ``conv``, its last ``conv - 1`` inputs ``[B, conv-1, 2 heads d_k]``; so a
sequence fed in pieces gives what one pass gives.

A document start (``resets``) sets ``log α = RESET_LOG_DECAY`` there (``α ≈ 4e-18``), so
the state before it is gone, and the convolution reads nothing across it. Not ``−∞``: the
chunked form takes differences of cumulative log decays, which ``−∞`` would make NaN, and
every exponent it forms is such a difference or a cumulative sum (never above 0), so a
large finite value cannot overflow.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor

from mmrec.contracts import Recurrence
from mmrec.layers.short_conv import ShortConv
from mmrec.ops import accumulation_dtype
from mmrec.ops.delta_rule import check_chunk, chunk_delta_rule_flops, delta_rule

# log α at a document start: e^-40 ≈ 4e-18 of the state is left, far below float32's resolution
# of it; a larger magnitude would cost the chunk's other decays precision (each start adds it
# to the chunk's cumulative log decay, whose differences the chunked form takes)
RESET_LOG_DECAY = -40.0


class DeltaRecurrence(Recurrence):
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["delta"] = "delta"
        chunk: PositiveInt = Field(64, description="tokens per chunk of the chunked delta rule (64 at head width 128)")
        conv: int | None = Field(4, ge=2, description="taps of the causal convolution on q and k; null: none")
        head_dim: PositiveInt | None = Field(
            None, description="width of the delta rule's heads (their values; d_model / head_dim heads), whose state "
                              "is key_dim x head_dim each; null: d_model / heads")
        heads: PositiveInt | None = Field(
            None, description="or: how many heads the delta rule has, each d_model / heads wide (a count that holds "
                              "at any d_model); null, with no head_dim: the model's n_heads")
        key_dim: PositiveInt | None = Field(
            None, description="width of each head's keys and queries, so each head's state is key_dim x head_dim: wider "
                              "keys keep more associations apart (state expansion); null: head_dim")
        intermediates: Literal["float32", "bfloat16"] = Field(
            "float32", description="dtype of the chunked form's stored intermediates (the chunk's matrices, its outputs "
                                   "and states between the two ops): bfloat16 halves their bytes and multiplies them "
                                   "in bf16, as fla's kernels do; the carried state and every sum stay float32 (a "
                                   "float64 model keeps float64)")
        beta_conv: int | None = Field(
            None, ge=2, description="taps of a causal convolution on the write strength β's logits (per head, starting as "
                                    "the identity): β from the tokens before each one too; null: none")

        @model_validator(mode="after")
        def _heads_named_one_way(self):
            if self.head_dim is not None and self.heads is not None:
                raise ValueError("set the delta rule's heads by head_dim (their width) or by heads (their count), not both")
            return self

        def head_width(self, d_model: int, n_heads: int) -> int:
            """The width of this layer's heads: ``head_dim``, or ``d_model`` over ``heads`` or the model's ``n_heads``."""
            return self.head_dim or d_model // (self.heads or n_heads)

        def check_model(self, model) -> None:
            if self.heads is not None and model.d_model % self.heads:
                raise ValueError(f"recurrence.heads {self.heads} must divide d_model ({model.d_model})")
            head_dim = self.head_width(model.d_model, model.n_heads)
            if model.d_model % head_dim:
                raise ValueError(f"recurrence.head_dim {head_dim} must divide d_model ({model.d_model})")
            if self.key_dim is not None and self.key_dim > head_dim:  # the tile holds the wider of the two
                check_chunk(self.chunk, self.key_dim, "recurrence.chunk", "recurrence.key_dim")
            else:
                check_chunk(self.chunk, head_dim, "recurrence.chunk")

    needs_input_gate = True  # g gates the output: h = σ(g) ⊙ o
    supports_resets = True

    def projection_widths(self, d_model: int, n_heads: int) -> dict[str, int]:
        """The block's extra projections, passed to ``forward`` by name (``β``: one per head of this layer)."""
        return {"q_r": self.n_heads * self.key_dim, "k_r": self.n_heads * self.key_dim, "beta": self.n_heads}

    def decay_width(self, d_model: int, n_heads: int) -> int:
        """One decay ``α`` per head of this layer."""
        return self.n_heads

    def __init__(self, config: Config, *, d_model: int, n_heads: int, init_std: float = 0.02):
        super().__init__()
        self.head_dim = config.head_width(d_model, n_heads)
        self.n_heads = d_model // self.head_dim
        self.key_dim = config.key_dim or self.head_dim
        self.chunk = config.chunk
        self.intermediates = None if config.intermediates == "float32" else torch.bfloat16
        self.conv = ShortConv(2 * self.n_heads * self.key_dim, config.conv, init="random") if config.conv is not None else None
        self.beta_conv = ShortConv(self.n_heads, config.beta_conv) if config.beta_conv is not None else None

    def flops_per_token(self, length: int, chunk_size: int) -> float:
        return chunk_delta_rule_flops(min(self.chunk, length), self.n_heads, self.key_dim, self.head_dim)

    def forward(self, z: Tensor, log_decay: Tensor, gate: Tensor, h0: dict | None = None, resets: Tensor | None = None,
                *, q_r: Tensor, k_r: Tensor, beta: Tensor) -> tuple[Tensor, dict]:
        """``z``, ``gate``: ``[B, T, D]``; ``q_r``, ``k_r``: ``[B, T, H d_k]``; ``log_decay`` (``log α``) and ``beta``
        (logits): ``[B, T, H]``; ``h0``: the dict this returned last time, or ``None``;
        ``resets``: ``[B, T]`` bool, document starts.

        Returns ``h`` ``[B, T, D]`` in ``z``'s dtype and the next state dict."""
        batch, length, _ = z.shape
        h0 = h0 or {}
        q, k, next_state = conv_silu_heads(self.conv, q_r, k_r, self.n_heads, h0, resets)
        if self.beta_conv is not None:
            beta, next_state["beta_conv"] = self.beta_conv(beta, h0.get("beta_conv"), resets)
        if resets is not None:
            log_decay = log_decay.masked_fill(resets.unsqueeze(-1), RESET_LOG_DECAY)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        v = z.view(batch, length, self.n_heads, self.head_dim)
        beta = torch.sigmoid(beta.to(q.dtype))  # [B, T, H]
        intermediates = self.intermediates if accumulation_dtype(v.dtype) == torch.float32 else None
        o, matrix = delta_rule(q, k, v, beta, log_decay, h0.get("matrix"), chunk_size=self.chunk,
                               intermediates=intermediates)
        h = torch.sigmoid(gate) * o.reshape(batch, length, -1)
        return h, {"matrix": matrix, **next_state}


def conv_silu_heads(conv: ShortConv | None, q: Tensor, k: Tensor, heads: int, state: dict,
                    resets: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
    """The delta rule's queries and keys before normalisation, as DeltaNet forms them: ``q``,
    ``k`` ``[B, T, H d_k]`` through one causal convolution over ``[q | k]`` (continuing
    ``state["conv"]``) and SiLU, in the accumulation dtype, split into heads ``[B, T, H, d_k]``.
    Returns them and ``{"conv": ...}``, the convolution's state to carry (empty without one)."""
    batch, length, width = q.shape
    qk, next_state = torch.cat([q, k], -1), {}  # [B, T, 2D]
    if conv is not None:
        qk, next_state["conv"] = conv(qk, state.get("conv"), resets)
    q, k = F.silu(qk).to(accumulation_dtype(q.dtype)).view(batch, length, 2, heads, width // heads).unbind(2)
    return q, k, next_state

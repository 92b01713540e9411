"""Fields every model architecture shares; each block's ``Config`` extends this.

Numbers must be finite (``allow_inf_nan=False``, inherited by every architecture's
``Config``); ``mmrec.recipes.parse`` refuses non-finite numbers in the variants' configs
(``recurrence``, ``memory``, ``planning``, plugins') as well.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class ModelConfigBase(BaseModel):
    """Embedding, depth and width of a language model made of registered blocks."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    vocab_size: PositiveInt
    d_model: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    ffn_dim: PositiveInt = Field(description="hidden width of the SwiGLU feed-forward")
    max_seq_len: PositiveInt = Field(2048, description="longest sequence the recipe is meant for")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = Field(False, description="biases in the linear layers")
    tie_embeddings: bool = False
    norm_eps: float = Field(1e-6, gt=0, le=1, description="RMSNorm's epsilon, in (0, 1]")
    init_std: float = Field(0.02, gt=0, le=1, description="standard deviation of the initial weights, in (0, 1]")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def comparable_dump(self) -> dict:
        """The section as JSON data in a form where two configs that build the same model
        compare equal (resuming compares a checkpoint's recipe with the current one)."""
        return self.model_dump(mode="json")

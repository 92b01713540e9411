"""The ``train`` section of a recipe: how ``python -m mmrec.recipes.train`` trains it.

Every number must be finite (``inf`` and ``nan`` are refused, as in the model section) and
within the range its description gives; the ranges are wide enough for any run a
nanoGPT or torchtitan user would configure, and exist to refuse typos (``3e4`` for
``3e-4``) and values that can only end in overflow, before any work is done.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

# AdamW moves every weight by about ``lr`` per update, whatever the gradient's scale; the
# weights start at ~0.02, so above 1 nothing trains (GPT-style runs use 1e-4 to 1e-2)
MAX_LR = 1.0

Beta = Annotated[float, Field(ge=0, lt=1)]


class TrainError(ValueError):
    """A problem with a run's settings that the user can fix."""


class TrainConfig(BaseModel):
    """Optimisation and run settings. Every field can be overridden with ``--set train.X=...``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: PositiveInt = 200
    batch_size: PositiveInt = 16
    seq_len: PositiveInt = 256
    grad_accum: PositiveInt = 1
    lr: float = Field(3e-3, gt=0, le=MAX_LR,
                      description="peak learning rate of AdamW, in (0, 1]: AdamW moves each weight by about lr per "
                                  "step, so above 1 no run trains (GPT-style runs use 1e-4 to 1e-2)")
    min_lr: float = Field(3e-4, ge=0, le=MAX_LR,
                          description="the rate the cosine decays to; one above train.lr is taken as train.lr "
                                      "(a constant rate after warmup)")
    warmup_steps: int = Field(20, ge=0, description="linear warmup; longer than train.steps leaves the peak unreached")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled decay; lr x weight_decay must be below 1")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW's betas, each in [0, 1)")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of the data's tail held out for validation")
    eval_every: PositiveInt = 50
    eval_batches: PositiveInt = 8
    save_every: PositiveInt = 100
    keep_last: PositiveInt = 3
    save: bool = Field(True, description="write checkpoints; false writes none at all (e.g. a throughput run)")
    save_best: bool = Field(False, description="also keep the checkpoint of the lowest validation loss in <out>/best")
    seed: int = Field(1337, ge=0, lt=2**63, description="seeds weights, data order and dropout; in [0, 2^63)")
    compile: bool = False
    activation_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    tf32: bool = Field(True, description="float32 matrix products on TF32 tensor cores (set_float32_matmul_precision "
                       "'high'): those autocast leaves in float32, such as the delta rule's chunk products, and all "
                       "of them in float32 training; false keeps them exact")
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: int = Field(4096, ge=256, description="at least the 256 bytes of the byte-level alphabet")
    sample_tokens: int = Field(200, ge=0, description="tokens generated as a sample at the end")
    reset_at_documents: bool = Field(
        False, description="start every layer's state again at each document of the packed windows (the token after "
                           "the shards' end-of-document token; mmrec.documents): needs --data of token shards and "
                           "variants that take resets")

    @model_validator(mode="after")
    def _decay_keeps_the_sign(self):
        # AdamW multiplies every decayed weight by (1 - lr * weight_decay) each step
        if self.lr * self.weight_decay >= 1:
            raise ValueError(f"train.lr x train.weight_decay is {self.lr * self.weight_decay:.3g}: AdamW multiplies the "
                             "weights by 1 - lr x weight_decay every step, so it must be below 1; lower train.weight_decay")
        return self

"""The ``train`` section of a recipe: how ``python -m mmrec.recipes.train`` trains it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class TrainConfig(BaseModel):
    """Optimisation and run settings. Every field can be overridden with ``--set train.X=...``."""

    model_config = ConfigDict(extra="forbid")

    steps: PositiveInt = 200
    batch_size: PositiveInt = 16
    seq_len: PositiveInt = 256
    grad_accum: PositiveInt = 1
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of the data's tail held out for validation")
    eval_every: PositiveInt = 50
    eval_batches: PositiveInt = 8
    save_every: PositiveInt = 100
    keep_last: PositiveInt = 3
    save: bool = Field(True, description="write checkpoints; false writes none at all (e.g. a throughput run)")
    save_best: bool = Field(False, description="also keep the checkpoint of the lowest validation loss in <out>/best")
    seed: int = 1337
    compile: bool = False
    activation_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: PositiveInt = 4096
    sample_tokens: int = Field(200, ge=0, description="tokens generated as a sample at the end")

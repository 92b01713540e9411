"""Optimizer and learning-rate schedule for training.

Weight decay goes to the weight matrices of linear layers only. Embeddings (and a head
tied to them), norm scales, biases, and the other learned vectors and tables of the
blocks (memory slot queries, initial states, decay biases) are not decayed: shrinking
them toward zero has no regularising meaning. A model may name more parameters to
exempt with a ``no_weight_decay()`` method returning parameter names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["build_optimizer", "build_scheduler", "lr_multiplier", "param_groups", "set_schedule_lr"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) not in embedding_weights
    }
    exempt = set(getattr(model, "no_weight_decay", lambda: ())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared parameters are listed once
        if not p.requires_grad:
            continue
        (decay if id(p) in decayed and name not in exempt else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused implementation when the model is on CUDA."""
    groups = param_groups(model, train.weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay, fused=on_cuda or None
    )


def lr_multiplier(step: int, train) -> float:
    """Learning rate of the update that follows ``step`` completed updates, over ``train.lr``:
    linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` updates,
    then a half cosine down to ``min_lr`` at ``steps``."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    floor = min(train.min_lr / train.lr, 1.0)
    span = max(train.steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, train))


def set_schedule_lr(optimizer: torch.optim.Optimizer, scheduler, train, step: int) -> None:
    """After loading a checkpoint: put the current recipe's rate for ``step`` in place, so
    that ``--set train.lr=...`` or ``train.steps`` changes take effect on resume (with
    unchanged settings this is exactly the rate the checkpoint holds)."""
    scheduler.base_lrs = [train.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = train.lr
        group["lr"] = train.lr * lr_multiplier(step, train)
    scheduler.last_epoch = step
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

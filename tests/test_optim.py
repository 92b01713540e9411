import itertools
import math

import pytest
import torch

import mmrec
from mmrec.optim import (
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    param_groups,
    set_schedule_lr,
)
from mmrec.recipes.train_config import TrainConfig


def test_schedule_warmup_then_cosine_to_min_lr():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [t.lr * lr_multiplier(s, t) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2)
    assert lrs[100] == pytest.approx(1e-4) and min(lrs) >= 1e-4 - 1e-12
    no_warmup = TrainConfig(steps=10, warmup_steps=0, lr=1.0, min_lr=0.0)
    assert lr_multiplier(0, no_warmup) == 1.0 and lr_multiplier(10, no_warmup) == pytest.approx(0.0)


def test_scheduler_and_resume_agree():
    t = TrainConfig(steps=30, warmup_steps=5)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, t)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [t.lr * lr_multiplier(s, t) for s in range(12)]
    fresh = build_optimizer(model, t)
    fresh_sched = build_scheduler(fresh, t)
    fresh.load_state_dict(opt.state_dict())
    fresh_sched.load_state_dict(sched.state_dict())
    set_schedule_lr(fresh, fresh_sched, t, 12)
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    fresh.step()
    fresh_sched.step()
    assert fresh.param_groups[0]["lr"] == t.lr * lr_multiplier(13, t)


def test_weight_decay_only_on_linear_matrices():
    model = mmrec.build("tiny", ["model.n_layers=2"])  # layer 1 has hds's non-linear matrices
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in exempt  # and the head tied to it
    assert not any("norm" in n for n in decayed)
    assert all(p.dim() == 2 for p in decay["params"])
    assert len(decayed) + len(exempt) == len(list(model.parameters()))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"head.weight"}
    assert decayed == linears


def test_fused_only_on_cuda():
    opt = build_optimizer(torch.nn.Linear(2, 2), TrainConfig())
    assert not opt.defaults.get("fused")
    assert math.isclose(opt.param_groups[0]["lr"], TrainConfig().lr)

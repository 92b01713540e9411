"""A model built on the meta device, given memory with ``to_empty`` and initialised with
``reset_parameters(seed)`` (as training does): every parameter is set, deterministically
per seed, with the same scheme as the constructor's. The sharded case (each process its
shard of the same weights) is in ``tests/recipes/test_distributed.py``."""

import pytest
import torch

import mmrec
from mmrec.layers.norm import RMSNorm

SMALL = ["model.n_layers=3", "model.d_model=64", "model.n_heads=4", "model.ffn_dim=96", "model.vocab_size=131"]
CONFIGS = {
    "mmrec-tied": ("tiny", [*SMALL, "model.memory.dim=16", "model.tie_embeddings=true"]),
    "mmrec-exact": ("tiny", [*SMALL, "model.memory.dim=16", "model.tie_embeddings=false",
                             "model.recurrence.kind=exact", "model.decay_init=[0.5,0.99]"]),
    "transformer-bias": ("transformer-tiny", [*SMALL, "model.bias=true", "model.tie_embeddings=false"]),
}


def materialised(name, seed):
    recipe, overrides = CONFIGS[name]
    with torch.device("meta"):
        model = mmrec.build(recipe, overrides)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))  # what an uninitialised parameter would keep
    model.reset_parameters(seed=seed)
    return model


def constant_names(name) -> set[str]:
    """The parameters the constructor sets to the same values whatever the RNG's state."""
    recipe, overrides = CONFIGS[name]
    torch.manual_seed(1)
    a = dict(mmrec.build(recipe, overrides).named_parameters())
    torch.manual_seed(2)
    b = dict(mmrec.build(recipe, overrides).named_parameters())
    return {k for k in a if torch.equal(a[k], b[k])}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_parameter_is_initialised(name):
    model = materialised(name, seed=7)
    assert not list(model.buffers())  # none to initialise; reset_parameters refuses a model with one
    for pname, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), pname
    assert (model.head.weight is model.embed.weight) == model.config.tie_embeddings


@pytest.mark.parametrize("name", CONFIGS)
def test_the_seed_decides_the_weights(name):
    a, b, c = materialised(name, 7), materialised(name, 7), materialised(name, 8)
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    random = set(pa) - constant_names(name)
    assert random and all(not torch.equal(pa[k], pc[k]) for k in random)
    assert all(torch.equal(pa[k], pc[k]) for k in set(pa) - random)
    # the global RNG is left alone: dropout masks and data order do not depend on the model
    state = torch.get_rng_state()
    materialised(name, 7)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", CONFIGS)
def test_same_scheme_as_the_constructor(name):
    """The constructor's weights (global RNG) and the seeded ones: the same constants, and
    random tensors of the same scale."""
    recipe, overrides = CONFIGS[name]
    built = dict(mmrec.build(recipe, overrides).named_parameters())
    constant = constant_names(name)  # norms, biases, decay biases
    assert any("norm" in k for k in constant) and any("decay_bias" in k for k in constant) == (recipe == "tiny")
    seeded = materialised(name, seed=3)
    for pname, p in seeded.named_parameters():
        ref = built[pname]
        if pname in constant:
            assert torch.equal(p, ref), pname
        elif ref.numel() >= 64:
            assert p.std().item() == pytest.approx(ref.std().item(), rel=0.25), pname
            assert p.mean().abs() < 4 * ref.std() / ref.numel() ** 0.5 + 1e-6, pname
    norms = [m for m in seeded.modules() if isinstance(m, RMSNorm)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    # residual outputs are scaled down by depth, so they are smaller than the other linears
    block = seeded.blocks[0]
    std = seeded.config.init_std
    for linear in block.residual_projections():
        assert linear.weight.std().item() == pytest.approx(std / (2 * seeded.config.n_layers) ** 0.5, rel=0.25)


def test_a_buffer_is_refused():
    model = materialised("mmrec-tied", seed=1)
    model.blocks[0].register_buffer("table", torch.zeros(3))
    with pytest.raises(NotImplementedError, match="buffers"):
        model.reset_parameters(seed=1)


class _ConstructorValue(torch.nn.Module):
    """A plugin-style module whose parameter only its constructor sets."""

    def __init__(self, use_item: bool):
        super().__init__()
        start = torch.tensor(0.5).item() if use_item else 0.5  # .item() fails on the meta device
        self.value = torch.nn.Parameter(torch.full((3,), start))


@pytest.mark.parametrize("use_item", [True, False])
def test_training_builds_for_real_what_meta_init_would_leave_unset(monkeypatch, use_item):
    from mmrec.recipes import train

    real_build = mmrec.build

    def build(recipe, overrides=None):
        model = real_build("tiny", SMALL[:1])
        model.blocks[0].extra = _ConstructorValue(use_item)
        return model

    assert real_build("tiny", SMALL[:1]).parameters_left_to_constructor() == []
    monkeypatch.setattr(mmrec, "build", build)
    model = train.build_model("tiny")
    assert model.parameters_left_to_constructor() == ["blocks.0.extra.value"]
    assert not any(p.is_meta for p in model.parameters())
    model.reset_parameters(seed=0)
    assert torch.equal(model.blocks[0].extra.value, torch.full((3,), 0.5))

"""The MM-Rec block's options from the seeds (gated integration, HEM's p and e, the memory
read's own value, HDS level 3): off by default and then the block is unchanged; on, each
is the formula it names, causal, and fed in pieces equal to one pass."""

import pytest
import torch

import mmrec
from mmrec.layers.mmrec_block import MMRecBlock
from mmrec.testing import CHECKS, check_variant
from tests.helpers import rel_err

BLOCK = {"vocab_size": 50, "d_model": 12, "n_layers": 1, "n_heads": 3, "ffn_dim": 20, "chunk_size": 5,
         "memory": {"kind": "hds", "slots": 16, "banks": 3, "dim": 4}}


def config(**options) -> MMRecBlock.Config:
    return mmrec.recipes.parse({"name": "t", "model": {**BLOCK, **options}}).model


def block(**options) -> MMRecBlock:
    torch.manual_seed(0)
    module = MMRecBlock(config(**options)).double()
    with torch.no_grad():  # parameters well away from their init
        for p in module.parameters():
            p.normal_(std=0.3)
    return module


def test_options_are_off_by_default():
    default = config()
    assert not default.gated_integration and default.pe_dim is None
    assert default.memory.levels == [0, 1, 2] and default.memory.own_value == 0.0
    plain = block()
    assert plain.pe_out is None and plain.mdi.integration is None and "p" not in plain.widths
    # the shipped recipes turn on only what a measurement chose: MDI's gated integration in
    # small (docs/benchmarks.md, "Quality at scale, 50M tokens, with MDI's gated integration")
    for name in mmrec.recipes.names():
        recipe = mmrec.recipes.load(name)
        if recipe.model.arch == "mmrec":
            assert recipe.model.gated_integration == (name == "small") and recipe.model.pe_dim is None, name
            assert recipe.model.memory.kind != "hds" or recipe.model.memory.own_value == 0.0, name


def test_options_are_in_the_recipe_schema():
    text = str(mmrec.recipes.schema())
    for field in ("gated_integration", "pe_dim", "own_value"):
        assert field in text


# the block's parameters before the options existed (this config at commit 4a60294)
PARAMETERS_BEFORE_THE_OPTIONS = {
    "memory.slot_queries": (3, 16, 4), "memory.initial": (3, 16, 4), "memory.write_gate": (3, 4),
    "memory.write_gate_bias": (3, 16), "memory.read.key": (3, 4, 4), "memory.read.value": (3, 4, 4),
    "norm.weight": (12,), "proj.proj.weight": (60, 12), "mdi.decay_bias": (12,), "mdi.context_bias": (12,),
    "mdi.decay.weight": (12, 12), "mdi.context.weight": (12, 12), "state_norm.weight": (12,), "out.weight": (12, 12),
    "ffn_norm.weight": (12,), "ffn.gate_up.weight": (40, 12), "ffn.down.weight": (12, 20),
}


def test_with_the_options_off_the_block_has_its_parameters_from_before_them():
    for module in (block(), block(gated_integration=False, pe_dim=None, memory={**BLOCK["memory"], "own_value": 0.0})):
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == PARAMETERS_BEFORE_THE_OPTIONS


def wired(module: MMRecBlock, x, options: bool = True):
    """The block's first residual written out (its FFN is zeroed by the caller): what the
    options add, by hand, around the block's own parts (left out with ``options=False``)."""
    u = module.norm(x)
    p = module.proj(u)
    z = p["z"]
    log_decay = module.log_decay(z, p["k"])
    h, _ = module.recurrence(z, log_decay, p.get("g"), None)
    context, _ = module.memory(p["q"], p["k"], p["v"], module.chunk_size)
    if options and module.mdi.integration is not None:
        weight, bias = module.mdi.integration.weight, module.mdi.integration.bias
        gate = torch.sigmoid(z @ weight[:, :12].T + h @ weight[:, 12:].T + bias)
        h = (1 - gate) * h + gate * z + log_decay.exp() * h
    if options and module.pe_out is not None:
        context = context + p["p"] @ module.pe_out.weight.T  # e = W_e p, p = W_p u
    return x + module.out(module.state_norm(h) + context)


@pytest.mark.parametrize("options", [{"gated_integration": True}, {"pe_dim": 5}, {"pe_dim": 7, "hem": False},
                                     {"gated_integration": True, "pe_dim": 3}])
def test_options_are_wired_as_written_float64_with_gradients(options):
    module = block(**options)
    with torch.no_grad():
        module.ffn.down.weight.zero_()
    x = torch.randn(2, 13, 12, dtype=torch.float64, requires_grad=True)
    got, want = module(x)[0], wired(module, x)
    assert rel_err(got, want) < 1e-12
    assert rel_err(got, wired(module, x, options=False)) > 1e-2  # the options do change the block
    probe = torch.randn_like(got)
    params = [x, *(p for name, p in module.named_parameters() if name.startswith(("mdi.integration", "pe_out.", "proj.")))]
    grads = torch.autograd.grad((got * probe).sum(), params, retain_graph=True)
    ref = torch.autograd.grad((want * probe).sum(), params)
    for g, r in zip(grads, ref):
        assert g.abs().max() > 0 and rel_err(g, r) < 1e-10


def test_gated_integration_refused_for_a_recurrence_without_mdi(monkeypatch):
    from mmrec.layers.parallel_recurrence import ParallelRecurrence

    monkeypatch.setattr(ParallelRecurrence, "needs_decay", False)  # a recurrence with a decay of its own
    assert block().mdi is None
    with pytest.raises(ValueError, match="gated_integration needs MDI"):
        block(gated_integration=True)


# the conformance suite (mmrec.testing): causality, pieces equal one pass, save and load,
# state size, gradients to every parameter, static decoding, for each option on and for
# hybrid stacks
OPTIONS = [
    pytest.param("recurrences", "parallel", None, {"gated_integration": True, "pe_dim": 5}, id="parallel-integration-pe"),
    pytest.param("recurrences", "exact", None, {"gated_integration": True}, id="exact-integration"),
    pytest.param("recurrences", "delta", {"chunk": 4}, {"gated_integration": True}, id="delta-integration"),  # γ per head
    pytest.param("recurrences", "delta", {"chunk": 4, "beta_conv": 3}, {"memory": {"kind": "none"}}, id="delta-beta-conv"),
    pytest.param("recurrences", "delta", {"chunk": 4, "head_dim": 12}, {"layer_overrides": [
        {"layers": [1], "recurrence": {"kind": "parallel"}, "memory": {"kind": "hds", "slots": 16, "banks": 2, "dim": 6}}],
        "memory": {"kind": "none"}}, id="delta-wide-heads-then-parallel"),
    pytest.param("memories", "hds", {"slots": 64, "banks": 2, "dim": 6, "levels": [0, 1, 2, 3], "own_value": 0.1}, None,
                 id="hds-level3-own-value"),
    # hybrid stacks (layer_overrides): one layer of another recurrence or memory
    pytest.param("recurrences", "delta", {"chunk": 4},
                 {"layer_overrides": [{"layers": [0], "recurrence": {"kind": "parallel"}, "decay_init": 0.9}]},
                 id="parallel-then-delta"),
    pytest.param("memories", "delta", None, {"layer_overrides": [{"layers": [1], "memory": {"kind": "hds", "slots": 16, "banks": 2, "dim": 6}}]},
                 id="delta-memory-then-hds"),
    pytest.param("recurrences", "delta", {"chunk": 4}, {"layer_overrides": [
        {"layers": [0], "memory": {"kind": "none"}},
        {"layers": [1], "recurrence": {"kind": "parallel"}, "decay_init": 0.9}]}, id="delta-without-memory-then-parallel"),
]


WITHOUT_RESETS = {"exact-integration", "delta-memory-then-hds"}  # refuse document resets, and say so


@pytest.mark.parametrize("group,kind,config,overrides", OPTIONS)
def test_options_pass_the_conformance_suite(group, kind, config, overrides, request):
    report = check_variant(group, kind, config, model_overrides=overrides, slow=False)
    if request.node.callspec.id in WITHOUT_RESETS:
        assert report.pop("resets").startswith("takes no document resets, and says so")
    assert report == {name: "ok" for name in CHECKS if name != "compile" and name in report}
    assert len(report) == len(CHECKS) - 1 - (request.node.callspec.id in WITHOUT_RESETS)


@pytest.mark.slow
@pytest.mark.parametrize("group,kind,config,overrides", OPTIONS)
def test_options_compile(group, kind, config, overrides):
    assert check_variant(group, kind, config, model_overrides=overrides, checks=["compile"], compile_backend="aot_eager") == {"compile": "ok"}


# layer_overrides: a hybrid stack, some layers with another recurrence, memory or decay

HYBRID = [{"layers": [1], "recurrence": {"kind": "delta", "chunk": 4}, "decay_init": [0.9, 0.999]},
          {"layers": [0, 2], "memory": {"kind": "window"}}]


def test_layer_overrides_give_each_layer_its_own_variants_and_decay():
    model = mmrec.build(mmrec.recipes.parse({"name": "t", "model": {**BLOCK, "n_layers": 4, "layer_overrides": HYBRID}}))
    kinds = [(type(b.recurrence).__name__, type(b.memory).__name__) for b in model.blocks]
    assert kinds == [("ParallelRecurrence", "WindowMemory"), ("DeltaRecurrence", "HDSMemory"),
                     ("ParallelRecurrence", "WindowMemory"), ("ParallelRecurrence", "HDSMemory")]
    # the delta layer: one decay per head, from its own range; the others: one per channel from the model's
    delta_decays, other_decays = model.blocks[1].mdi.initial_decay(), model.blocks[3].mdi.initial_decay()
    assert delta_decays.numel() == BLOCK["n_heads"] and other_decays.numel() == BLOCK["d_model"]
    assert delta_decays.min().item() == pytest.approx(0.9) and delta_decays.max().item() == pytest.approx(0.999)
    assert torch.allclose(other_decays, torch.full_like(other_decays, 0.99))


def test_a_layer_override_sets_its_layers_recurrence_dropout_only():
    # the dropout tuned for a per-channel recurrence need not suit a delta layer, whose write
    # replaces what its state holds for a key with the (dropped) value
    model = mmrec.build(mmrec.recipes.parse({"name": "t", "model": {
        **BLOCK, "n_layers": 3, "recurrence_dropout": 0.4, "layer_overrides": [{"layers": [1], "recurrence_dropout": 0.0}]}}))
    assert [b.recurrence_dropout.p for b in model.blocks] == [0.4, 0.0, 0.4]


def test_without_layer_overrides_every_layer_is_the_models():
    config = mmrec.recipes.parse({"name": "t", "model": {**BLOCK, "n_layers": 2}}).model
    assert config.layer_overrides == [] and config.for_layer(1) is config


@pytest.mark.parametrize("override,message", [
    ({"layers": [9], "recurrence": {"kind": "delta"}}, r"layer_overrides\[0\].layers: layer 9, but the model has 2"),
    ({"layers": [0], "d_model": 8}, r"layer_overrides\[0\].d_model: the same for every layer; a layer may set recurrence"),
    ({"layers": [0], "dropout": 0.1}, r"layer_overrides\[0\].dropout: the same for every layer; a layer may set"),
    ({"layers": [0], "recurrence_dropout": 1.0}, r"layer_overrides\[0\].recurrence_dropout: "),
    ({"layers": [0], "recurence": {"kind": "delta"}}, r"layer_overrides\[0\].recurence: unknown field; did you mean 'recurrence'"),
    ({"layers": [0]}, "sets nothing for its layers"),
    ({"layers": []}, "at least 1 item"),
    ({"layers": [1, 1], "decay_init": 0.9}, r"layer_overrides\[0\].layers: a layer is listed twice"),
    ({"decay_init": 0.9}, "name the layers by 'layers' .* or by 'every'"),
    ({"layers": [0], "every": 2, "decay_init": 0.9}, "not both"),
    ({"layers": [0], "offset": 1, "decay_init": 0.9}, "'offset' goes with 'every'"),
    ({"every": 2, "offset": 2, "decay_init": 0.9}, r"layer_overrides\[0\].offset: 2 names no layer of 2"),
    ({"every": 0, "decay_init": 0.9}, "greater than 0"),
    ({"layers": [1], "recurrence": {"kind": "deltaa"}}, r"layer_overrides\[0\].recurrence.kind: unknown recurrence 'deltaa'.*did you mean 'delta'"),
    ({"layers": [1], "recurrence": {"kind": "delta", "chunkk": 4}}, r"layer_overrides\[0\].recurrence.chunkk: Extra inputs"),
    ({"layers": [1], "decay_init": 1.5}, r"layer_overrides\[0\].decay_init: "),
])
def test_bad_layer_overrides_are_refused_with_their_path(override, message):
    with pytest.raises(mmrec.recipes.RecipeError, match=message):
        mmrec.recipes.parse({"name": "t", "model": {**BLOCK, "n_layers": 2, "layer_overrides": [override]}})


def test_a_variant_of_the_models_kind_changes_only_the_fields_given():
    model = {**BLOCK, "n_layers": 3, "memory": {"kind": "hds", "slots": 16, "banks": 3, "dim": 4}}
    same_kind = mmrec.recipes.parse({"name": "t", "model": {**model, "layer_overrides": [
        {"layers": [1], "memory": {"slots": 32}}, {"layers": [2], "memory": {"kind": "hds", "dim": 6}}]}}).model
    assert [(c.memory.kind, c.memory.slots, c.memory.banks, c.memory.dim) for c in map(same_kind.for_layer, range(3))] == [
        ("hds", 16, 3, 4), ("hds", 32, 3, 4), ("hds", 16, 3, 6)]
    other_kind = mmrec.recipes.parse({"name": "t", "model": {**model, "layer_overrides": [
        {"layers": [1], "memory": {"kind": "window"}}]}}).model.for_layer(1)
    assert other_kind.memory.kind == "window" and other_kind.memory.kv_heads is None  # its own defaults
    window_model = {**BLOCK, "n_layers": 2, "memory": {"kind": "window", "kv_heads": 1}}
    assert mmrec.recipes.parse({"name": "t", "model": {**window_model, "layer_overrides": [
        {"layers": [1], "memory": {"rope_base": 500.0}}]}}).model.for_layer(1).memory.model_dump() == {
        "kind": "window", "kv_heads": 1, "rope_base": 500.0}


def test_a_layer_named_twice_is_refused():
    twice = [{"layers": [0], "decay_init": 0.9}, {"layers": [1, 0], "decay_init": 0.95}]
    with pytest.raises(mmrec.recipes.RecipeError, match=r"layer_overrides\[1\]: layer 0 is in layer_overrides\[0\] too"):
        mmrec.recipes.parse({"name": "t", "model": {**BLOCK, "n_layers": 2, "layer_overrides": twice}})
    # patterns meet where their offsets and periods do, within the model's depth
    for groups, shared in ((({"every": 4}, {"every": 6, "offset": 2}), 8), (({"every": 3, "offset": 1}, {"layers": [2, 7]}), 7),
                           (({"every": 2}, {"every": 2, "offset": 1}), None), (({"every": 5}, {"every": 7, "offset": 16}), None)):
        recipe = {"name": "t", "model": {**BLOCK, "n_layers": 20, "layer_overrides": [
            {**groups[0], "decay_init": 0.9}, {**groups[1], "decay_init": 0.95}]}}
        if shared is None:  # every 5 and 7 from 16 meet at 30, past 20 layers
            mmrec.recipes.parse(recipe)
        else:
            with pytest.raises(mmrec.recipes.RecipeError, match=rf"layer {shared} is in layer_overrides\[0\] too"):
                mmrec.recipes.parse(recipe)


def test_every_names_a_pattern_that_holds_at_any_depth():
    group = {"every": 3, "offset": 1, "recurrence": {"kind": "delta"}, "memory": {"kind": "none"}}
    for n_layers, delta_layers in ((8, [1, 4, 7]), (2, [1]), (4, [1])):
        model = mmrec.build(mmrec.recipes.parse({"name": "t", "model": {**BLOCK, "n_layers": n_layers, "layer_overrides": [group]}}))
        assert [i for i, block in enumerate(model.blocks) if type(block.recurrence).__name__ == "DeltaRecurrence"] == delta_layers
        assert all(type(block.memory).__name__ == ("NoMemory" if i in delta_layers else "HDSMemory")
                   for i, block in enumerate(model.blocks))


def test_a_group_dumps_the_way_its_layers_were_named():
    """Checkpoints keep the recipe as dumped: a list group dumps as it did before 'every'
    existed (so older runs still resume), a pattern without 'layers'; both parse back."""
    groups = [{"layers": [1], "decay_init": 0.9}, {"every": 3, "offset": 2, "decay_init": 0.95}]
    recipe = mmrec.recipes.parse({"name": "t", "model": {**BLOCK, "n_layers": 6, "layer_overrides": groups}})
    dumped = recipe.model_dump(mode="json")
    assert dumped["model"]["layer_overrides"] == groups
    assert mmrec.recipes.parse(dumped).model_dump(mode="json") == dumped


def test_overlapping_patterns_are_found_without_walking_the_layers():
    """A pair of patterns is solved (Chinese remainder), a pair of lists intersected: both
    are quick at any depth, and agree with a walk over the layers."""
    import random

    from mmrec.layers.mmrec_block import LayerOverride

    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 60)
        groups = [LayerOverride(every=rng.randint(1, 9), offset=rng.randint(0, 12)) if rng.random() < 0.6
                  else LayerOverride(layers=rng.sample(range(40), rng.randint(1, 5))) for _ in range(2)]
        walked = next((i for i in range(n) if groups[0].names(i) and groups[1].names(i)), None)
        assert groups[0].first_shared(groups[1], n) == groups[1].first_shared(groups[0], n) == walked, groups
    far = [LayerOverride(every=99_999_999, offset=1), LayerOverride(every=2)]
    assert far[0].first_shared(far[1], 100_000_000) is None  # 1 + 99,999,999 is past the depth
    assert LayerOverride(every=6, offset=4).first_shared(LayerOverride(every=10, offset=2), 10**12) == 22


def test_resuming_compares_the_layers_named_not_how_the_groups_are_written():
    as_list = {"layers": [4, 0, 8], "decay_init": 0.9}
    as_pattern = {"every": 4, "decay_init": 0.9}
    dumps = [mmrec.recipes.parse({"name": "t", "model": {**BLOCK, "n_layers": 12, "layer_overrides": [g]}}).model.comparable_dump()
             for g in (as_list, as_pattern)]
    assert dumps[0] == dumps[1] and dumps[0]["layer_overrides"] == [{"layers": [0, 4, 8], "decay_init": 0.9}]

import pytest
import torch

import mmrec
import mmrec.testing
from mmrec import registry
from mmrec.contracts import ChunkedMemory
from mmrec.layers.projection import split_state_dict
from mmrec.ops.delta_rule import chunk_delta_rule_flops
from tests.helpers import parameter_gradients

CHUNK = 8


def small_recipe(**model):
    """A float64-friendly toy: 2 layers, chunks of 8 tokens, every HDS level."""
    base = {
        "arch": "mmrec", "vocab_size": 50, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40,
        "chunk_size": CHUNK, "memory": {"kind": "hds", "slots": 16, "banks": 2, "dim": 6},
        "planning": {"lambda_p": 0.1},
    }
    return mmrec.recipes.parse({"name": "toy", "model": {**base, **model}})


def variant_recipes():
    """Every registered recurrence with every registered memory, and the Transformer."""
    cases = [
        pytest.param({"recurrence": {"kind": scan}, "memory": {"kind": memory, **({"slots": 16, "banks": 2, "dim": 6} if memory == "hds" else {})}}, id=f"{scan}-{memory}")
        for scan in registry.names("recurrences")
        for memory in registry.names("memories")
    ]
    cases.append(pytest.param({"short_conv": 3, "short_conv_init": "random"}, id="parallel-hds-conv"))
    cases.append(pytest.param({"arch": "transformer", "chunk_size": None}, id="transformer"))
    return cases


def build_variant(overrides):
    model = {k: v for k, v in overrides.items() if v is not None}
    if model.get("arch") == "transformer":
        model = {"arch": "transformer", "vocab_size": 50, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40}
        return mmrec.LanguageModel(mmrec.recipes.parse({"name": "toy", "model": model}).model).double()
    return mmrec.LanguageModel(small_recipe(**model).model).double()


@pytest.mark.parametrize("overrides", variant_recipes())
@pytest.mark.parametrize("t", [3, CHUNK - 1, CHUNK, 2 * CHUNK + 5])  # within a chunk and at/after boundaries
def test_future_tokens_never_change_earlier_logits(overrides, t):
    model = build_variant(overrides).eval()
    ids = torch.randint(0, 50, (2, 4 * CHUNK + 3))
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, 50, changed[:, t + 1:].shape)
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-12)
    assert (before[:, t + 1:] - after[:, t + 1:]).abs().max() > 1e-6  # the test can see a change


def test_long_term_memory_carries_information_across_chunks():
    model = build_variant({}).eval()
    ids = torch.randint(0, 50, (1, 4 * CHUNK))
    changed = ids.clone()
    changed[:, 0] = (ids[:, 0] + 1) % 50
    # with the recurrence cut (zero decay), only the memory can carry chunk 0 into chunk 3
    for block in model.blocks:
        torch.nn.init.constant_(block.mdi.decay_bias, -50.0)
    with torch.no_grad():
        delta = (model(ids).logits - model(changed).logits)[:, 3 * CHUNK:].abs().max()
    assert delta > 1e-8


@pytest.mark.parametrize("overrides", variant_recipes())
def test_every_parameter_gets_a_finite_nonzero_gradient(overrides):
    model = build_variant(overrides).train()
    ids = torch.randint(0, 50, (2, 3 * CHUNK + 1))
    out = model(ids[:, :-1], return_aux_loss=True)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name


def test_aux_loss_only_when_asked():
    model = build_variant({})
    ids = torch.randint(0, 50, (1, 20))
    assert model(ids).aux_loss is None
    aux = model(ids, return_aux_loss=True).aux_loss
    assert aux.ndim == 0 and aux > 0


def test_hem_fused_and_separate_models_are_the_same_function():
    fused = mmrec.LanguageModel(small_recipe(hem=True).model).double()
    separate = mmrec.LanguageModel(small_recipe(hem=False).model).double()
    state = fused.state_dict()
    for i, block in enumerate(fused.blocks):
        state = split_state_dict(state, block.widths, prefix=f"blocks.{i}.proj.")
    separate.load_state_dict(state)
    ids = torch.randint(0, 50, (2, 21))
    torch.testing.assert_close(fused(ids).logits, separate(ids).logits, rtol=1e-12, atol=1e-12)


def test_tied_embeddings_share_one_matrix():
    model = mmrec.build("tiny")
    assert model.head.weight is model.embed.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_16k_token_forward_of_tiny_on_cpu():
    model = mmrec.build("tiny").eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 16384))).logits
    assert logits.shape == (1, 16384, 256)
    assert torch.isfinite(logits).all()


def test_activation_checkpointing_gives_the_same_gradients():
    model = build_variant({}).train()
    ids = torch.randint(0, 50, (2, 19))
    loss = lambda out: out.logits.square().mean() + out.aux_loss  # noqa: E731
    loss(model(ids, return_aux_loss=True)).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_activation_checkpointing(True)
    loss(model(ids, return_aux_loss=True)).backward()
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("overrides", [[], ["model.short_conv=4", "model.short_conv_init=random"]], ids=["tiny", "conv"])
def test_compiles_fullgraph_without_graph_breaks(overrides):
    model = mmrec.build("tiny", overrides).eval()
    ids = torch.randint(0, 256, (2, 150))  # two full chunks and a partial one
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", variant_recipes())
def test_compiled_gradients_equal_eager(overrides):
    # Dynamo and AOTAutograd (the backend here) trace the backward; a compiled graph once
    # gave finite but zero gradients to every decay (PyTorch 2.11, tests/layers/test_mdi.py),
    # so every parameter's gradient is compared, in float32 as training runs.
    model = build_variant(overrides).float()
    ids = torch.randint(0, 50, (2, 2 * CHUNK + 3))
    want = parameter_gradients(model, model, ids)
    torch._dynamo.reset()
    got = parameter_gradients(model, torch.compile(model, backend="aot_eager"), ids)
    for name, grad in want.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_recurrence_dropout_drops_the_recurrence_input_only_and_only_in_training():
    model = build_variant({"recurrence_dropout": 0.5})
    block = model.blocks[0]
    seen = {}
    block.recurrence.register_forward_pre_hook(lambda module, args: seen.update(recurrence=args[0]))
    block.mdi.register_forward_pre_hook(lambda module, args: seen.update(mdi=args[0]))
    ids = torch.randint(0, 50, (2, 2 * CHUNK + 3))
    model.train()
    model(ids)
    dropped, kept = seen["recurrence"], seen["mdi"]  # MDI reads z whole
    assert 0.4 < (dropped == 0).double().mean() < 0.6 and (kept != 0).all()
    torch.testing.assert_close(dropped, torch.where(dropped == 0, 0.0, 2 * kept))
    model.eval()
    model(ids)
    assert torch.equal(seen["recurrence"], seen["mdi"])


def _state_tensors(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _state_tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _state_tensors(v)
    elif torch.is_tensor(x):
        yield x


@pytest.mark.parametrize("recipe", ["tiny", "transformer-tiny"])
def test_return_state_false_gives_the_same_logits_and_no_state(recipe):
    torch.manual_seed(0)
    model = mmrec.build(recipe, ["model.n_layers=2"])
    ids = torch.randint(0, 256, (2, 150))
    full = model(ids)
    lean = model(ids, return_state=False)
    assert lean.state is None and full.state is not None
    assert torch.equal(lean.logits, full.logits)


@pytest.mark.parametrize("recipe", ["tiny", "transformer-tiny"])
def test_logits_at_gives_those_positions_logits_with_gradients(recipe):
    torch.manual_seed(0)
    model = mmrec.build(recipe, ["model.n_layers=2"]).double()
    ids = torch.randint(0, 256, (3, 37))
    at = torch.stack([torch.randperm(37)[:5] for _ in range(3)])  # [B, P], a different set per row
    full = model(ids, return_state=False).logits
    some = model(ids, return_state=False, logits_at=at).logits
    assert some.shape == (3, 5, 256)
    torch.testing.assert_close(some, full.gather(1, at[..., None].expand(-1, -1, 256)), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(some.sum(), list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad(full.gather(1, at[..., None].expand(-1, -1, 256)).sum(), list(model.parameters()),
                               allow_unused=True)
    for a, b in zip(grads, want):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-10, atol=1e-12))
    model.stream_piece = 16  # the no-gradient path that runs long inputs in pieces
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_at=at).logits, some.detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        model(ids, targets=ids, logits_at=at)


@pytest.mark.parametrize("overrides", [c for c in variant_recipes() if c.id != "transformer"])
def test_mmrec_state_does_not_pin_activations(overrides):
    # a view of the chunk in progress (or of the history) would keep whole activations alive
    torch.manual_seed(0)
    model = build_variant(overrides)
    length = 5 * CHUNK + 3  # 3 tokens pending
    state = model(torch.randint(0, 50, (2, length))).state
    tensors = list(_state_tensors(state.layers))
    if isinstance(model.blocks[0].memory, ChunkedMemory):  # it carries the chunk in progress
        assert any(t.dim() == 3 and t.shape[1] == 3 for t in tensors)
    for t in tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_flops_per_token_counts_parameters_and_each_blocks_mixing():
    """MFU's numerator: 6 per parameter plus what each block's sequence mixing adds, which
    the blocks and their variants count themselves (no architecture named in the count)."""
    plain = "docs/results/recipes/tiny-all-parallel.json"  # parallel + hds in every layer
    with torch.device("meta"):
        mmrec_model, transformer = mmrec.build(plain), mmrec.build("transformer-tiny")
        delta = mmrec.build(plain, ["model.recurrence.kind=delta"])
        window = mmrec.build(plain, ['model.memory={"kind": "window"}'])
        hybrid = mmrec.build("tiny")  # layer 0: delta with no memory
    c = mmrec_model.config  # hds: 32 slots read over levels 0-2 (32 + 8 + 2), written from keys of 2 x 64
    hds = 12 * (32 + 8 + 2) * c.d_model + 12 * 32 * 128
    assert mmrec_model.flops_per_token(256) == 6 * mmrec_model.num_parameters() + c.n_layers * hds
    delta_layer = chunk_delta_rule_flops(64, 1, c.d_model)  # one head as wide as the model, 64-token chunks
    assert hybrid.flops_per_token(256) == 6 * hybrid.num_parameters() + (c.n_layers - 1) * hds + delta_layer
    t = transformer.config
    assert transformer.flops_per_token(256) == 6 * transformer.num_parameters() + 6 * t.n_layers * 256 * t.d_model
    assert transformer.flops_per_token(512) > transformer.flops_per_token(256)  # attention grows with length
    assert mmrec_model.flops_per_token(512) == mmrec_model.flops_per_token(256)  # the state does not
    assert delta.flops_per_token(256) - 6 * delta.num_parameters() > c.n_layers * hds  # the matrix state's work
    assert window.flops_per_token(256) - 6 * window.num_parameters() == c.n_layers * 12 * 1.5 * c.chunk_size * c.d_model


RESET_CASES = [
    pytest.param({"short_conv": 3, "short_conv_init": "random"}, id="parallel-hds-conv"),
    pytest.param({"recurrence": {"kind": "delta", "chunk": 5, "beta_conv": 3}, "memory": {"kind": "none"}}, id="delta"),
    pytest.param({"arch": "transformer", "chunk_size": None}, id="transformer"),
]


def _reset_model(overrides):
    """The model, its convolutions given random taps (those that start as the identity mix
    no tokens, so a tap across a start would not show)."""
    model = build_variant(overrides)
    mmrec.testing.random_convolution_taps(model)
    return model


def _with_starts(length: int) -> torch.Tensor:
    resets = torch.zeros(2, length, dtype=torch.bool)
    resets[0, [5, 13, 14]] = True
    resets[1, 20] = True
    return resets


@pytest.mark.parametrize("overrides", RESET_CASES)
def test_document_resets_hold_when_streamed_in_pieces(overrides):
    """The no-gradient path that runs long inputs in pieces hands each piece its resets."""
    model = _reset_model(overrides).eval()
    ids, resets = torch.randint(0, 50, (2, 29)), _with_starts(29)
    with torch.no_grad():
        whole = model(ids, resets=resets).logits
        model.stream_piece = 6
        torch.testing.assert_close(model(ids, resets=resets).logits, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides", RESET_CASES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_nothing_flows_back_across_a_document_start(overrides, checkpointing):
    """In training (dropout off), with and without activation checkpointing: the loss of a
    document's tokens has no gradient with respect to the embeddings of earlier documents."""
    model = _reset_model(overrides).train()
    model.set_activation_checkpointing(checkpointing)
    ids, resets = torch.randint(0, 50, (2, 29)), _with_starts(29)
    embedded = []
    handle = model.embed.register_forward_hook(lambda module, args, out: embedded.append(out) or out.retain_grad())
    model(ids, resets=resets).logits[0, 14:].square().sum().backward()  # the third document of row 0
    handle.remove()
    grad = embedded[0].grad
    assert grad[0, :14].abs().max() < 1e-12 and grad[0, 14:].abs().max() > 0 and grad[1].abs().max() == 0


def test_resets_are_checked():
    model = build_variant({}).eval()
    ids = torch.randint(0, 50, (2, 9))
    with pytest.raises(ValueError, match=r"resets must be a bool tensor shaped like input_ids \(2, 9\), got torch.int64"):
        model(ids, resets=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shaped like input_ids \(2, 9\), got torch.bool \(2, 8\)"):
        model(ids, resets=torch.zeros(2, 8, dtype=torch.bool))
    exact = build_variant({"recurrence": {"kind": "exact"}}).eval()
    assert not exact.supports_resets() and exact.unsupported_resets().startswith("layer 0 (its recurrence ExactRecurrence)")
    with pytest.raises(ValueError, match="document resets are not supported by layer 0 .*; layer 1"):
        exact(ids, resets=torch.zeros(2, 9, dtype=torch.bool))

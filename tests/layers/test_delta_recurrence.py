"""The ``delta`` recurrence in the MM-Rec block: its contract with the block, state, decoding."""

import random

import pytest
import torch
import torch.nn.functional as F

import mmrec
from mmrec.decode import StaticDecoder
from mmrec.layers.delta_recurrence import DeltaRecurrence
from mmrec.layers.mdi import MDI
from mmrec.layers.mmrec_block import MMRecBlock
from mmrec.ops.delta_rule import naive_delta_rule
from mmrec.state import State
from tests.helpers import assert_causal, rel_err


def toy(dtype=torch.float64, recurrence=None, **model):
    """Odd sizes: 6-wide heads, memory chunks of 7 tokens, delta chunks of 5."""
    base = {"arch": "mmrec", "vocab_size": 50, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40, "chunk_size": 7,
            "memory": {"kind": "hds", "slots": 16, "banks": 2, "dim": 6}, "planning": {"lambda_p": 0.1},
            "recurrence": recurrence or {"kind": "delta", "chunk": 5}}
    return mmrec.build({"name": "toy", "model": {**base, **model}}).to(dtype).eval()


def random_split(length, rng):
    sizes = []
    while length:
        sizes.append(min(length, rng.choice([1, 1, 2, 3, 5, 6, 11])))
        length -= sizes[-1]
    return sizes


@pytest.mark.parametrize("key_dim", [None, 7, 3])  # the heads' width (5), wider keys, narrower
def test_layer_equals_the_reference_on_its_inputs(key_dim):
    """conv → SiLU → L2 norm per head → delta rule with v = z, β = σ(beta), α from log_decay
    → σ(g) ⊙ o, against the float64 token loop; with ``key_dim`` the state is key_dim x 5."""
    layer = DeltaRecurrence(DeltaRecurrence.Config(chunk=4, conv=3, key_dim=key_dim), d_model=10, n_heads=2).double()
    batch, length, keys = 2, 13, key_dim or 5
    assert layer.projection_widths(10, 2) == {"q_r": 2 * keys, "k_r": 2 * keys, "beta": 2}
    z, gate = (torch.randn(batch, length, 10, dtype=torch.float64) for _ in range(2))
    q_r, k_r = (torch.randn(batch, length, 2 * keys, dtype=torch.float64) for _ in range(2))
    beta, log_decay = torch.randn(batch, length, 2, dtype=torch.float64), -torch.rand(batch, length, 2, dtype=torch.float64)
    h, state = layer(z, log_decay, gate, None, q_r=q_r, k_r=k_r, beta=beta)
    w = layer.conv.weight
    qk = torch.cat([q_r, k_r], -1)
    padded = F.pad(qk, [0, 0, 2, 0])
    conv = sum(w[j] * padded[:, j : j + length] for j in range(3))
    q, k = F.silu(conv).view(batch, length, 2, 2, keys).unbind(2)
    o, matrix = naive_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), z.view(batch, length, 2, 5),
                                 torch.sigmoid(beta), log_decay)
    assert state["matrix"].shape == (batch, 2, keys, 5)
    assert rel_err(h, torch.sigmoid(gate) * o.reshape(batch, length, 10)) < 1e-12
    assert rel_err(state["matrix"], matrix) < 1e-12
    assert torch.equal(state["conv"], qk[:, -2:])


def test_block_contract_adds_projections_and_per_head_decays():
    config = toy().config
    block = MMRecBlock(config)
    assert list(block.widths) == ["q", "k", "v", "z", "g", "q_r", "k_r", "beta"]
    assert (block.widths["q_r"], block.widths["k_r"], block.widths["beta"]) == (24, 24, 4)
    assert block.mdi.decay.weight.shape == (4, 24) and block.mdi.context.weight.shape == (4, 12)
    # the built-in recurrences get what they got before
    parallel = MMRecBlock(toy(recurrence={"kind": "parallel"}).config)
    assert list(parallel.widths) == ["q", "k", "v", "z", "g"] and parallel.mdi.decay.weight.shape == (24, 24)
    assert list(MMRecBlock(toy(recurrence={"kind": "exact"}).config).widths) == ["q", "k", "v", "z"]


def test_head_dim_sets_the_layers_own_heads():
    """``head_dim`` 12 in a model of 4 heads of 6: the layer runs 2 heads of 12 (β and α per
    head of its own), and equals a layer built with the model's heads at that width."""
    block = MMRecBlock(toy(recurrence={"kind": "delta", "chunk": 5, "head_dim": 12}).config)
    assert block.widths["beta"] == 2 and block.mdi.decay.weight.shape == (2, 24)
    torch.manual_seed(0)
    wide = DeltaRecurrence(DeltaRecurrence.Config(chunk=4, head_dim=12), d_model=24, n_heads=4).double()
    same = DeltaRecurrence(DeltaRecurrence.Config(chunk=4), d_model=24, n_heads=2).double()
    same.load_state_dict(wide.state_dict())
    z, gate, q_r, k_r = (torch.randn(2, 11, 24, dtype=torch.float64) for _ in range(4))
    beta, log_decay = torch.randn(2, 11, 2, dtype=torch.float64), -torch.rand(2, 11, 2, dtype=torch.float64)
    h, state = wide(z, log_decay, gate, None, q_r=q_r, k_r=k_r, beta=beta)
    want, want_state = same(z, log_decay, gate, None, q_r=q_r, k_r=k_r, beta=beta)
    assert state["matrix"].shape == (2, 2, 12, 12) and torch.equal(h, want) and torch.equal(state["matrix"], want_state["matrix"])
    with pytest.raises(ValueError, match="recurrence.head_dim 7 must divide d_model"):
        toy(recurrence={"kind": "delta", "head_dim": 7})


def test_heads_sets_their_count_at_any_width():
    """``heads`` 1 is one head as wide as the model, whatever ``d_model`` is; it and
    ``head_dim`` name the same thing, so not both."""
    assert MMRecBlock(toy(recurrence={"kind": "delta", "chunk": 5, "heads": 1}).config).widths["beta"] == 1
    for d_model in (24, 48):
        layer = DeltaRecurrence(DeltaRecurrence.Config(heads=2), d_model=d_model, n_heads=4)
        assert (layer.n_heads, layer.head_dim) == (2, d_model // 2)
    with pytest.raises(ValueError, match="not both"):
        DeltaRecurrence.Config(heads=2, head_dim=12)
    with pytest.raises(ValueError, match="recurrence.heads 5 must divide d_model"):
        toy(recurrence={"kind": "delta", "heads": 5})


def test_mdi_width_spreads_a_decay_range_over_its_outputs():
    mdi = MDI(16, 8, decay_init=(0.9, 0.999), width=3).double()
    log_decay = mdi(torch.zeros(1, 1, 16, dtype=torch.float64), torch.zeros(1, 1, 8, dtype=torch.float64))
    assert log_decay.shape == (1, 1, 3)
    torch.testing.assert_close(log_decay.exp().flatten(), torch.tensor([0.9, 0.99, 0.999], dtype=torch.float64))


@pytest.mark.parametrize("t", [2, 4, 5, 13])  # inside a delta chunk, at and after its boundaries
def test_future_tokens_never_change_earlier_logits(t):
    assert_causal(toy(), torch.randint(0, 50, (2, 24)), t, vocab=50)


@pytest.mark.parametrize("trial", range(3))
@pytest.mark.parametrize("conv", [4, None])
def test_pieces_with_carried_state_equal_one_pass(trial, conv):
    model = toy(recurrence={"kind": "delta", "chunk": 5, "conv": conv})
    ids = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        whole = model(ids).logits
        pieces, state, start = [], None, 0
        for size in random_split(40, random.Random(trial)):  # 1-token steps among them
            out = model(ids[:, start : start + size], state=state)
            pieces.append(out.logits)
            state, start = out.state, start + size
    assert rel_err(torch.cat(pieces, 1), whole) < 1e-12
    assert state.layers[0]["h"]["matrix"].shape == (2, 4, 6, 6)
    assert ("conv" in state.layers[0]["h"]) == (conv is not None)


def test_key_dim_widens_the_state_and_a_model_streams_and_decodes_as_one_pass():
    """Keys of 9 on heads of 6: the state is 9 x 6 per head; pieces, a static decode and a
    future token behave as in the plain layer; a key width past the kernel's tile is refused."""
    model = toy(recurrence={"kind": "delta", "chunk": 5, "key_dim": 9})
    assert MMRecBlock(model.config).widths["q_r"] == 36
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :11])
        rest = model(ids[:, 11:], state=first.state).logits
        decoder = StaticDecoder(model, first.state, cuda_graph=False)
        steps = torch.stack([decoder.step(ids[:, t : t + 1]).clone() for t in range(11, 17)], 1)
    assert first.state.layers[0]["h"]["matrix"].shape == (2, 4, 9, 6)
    assert rel_err(torch.cat([first.logits, rest], 1), whole) < 1e-12
    assert rel_err(steps, whole[:, 11:17]) < 1e-12
    assert_causal(model, ids, 7, vocab=50)
    with pytest.raises(ValueError, match="recurrence.chunk 32 at recurrence.key_dim 512: .* at most 16"):
        mmrec.recipes.load("tiny", ["model.recurrence.kind=delta", "model.recurrence.key_dim=512", "model.recurrence.chunk=32"])


def test_gradient_reaches_every_parameter_of_the_block():
    model = toy().train()
    block = model.blocks[0]
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    y, _, aux = block(x, return_aux_loss=True)
    (y.square().mean() + aux).backward()
    names = [name for name, _ in block.named_parameters()]
    assert "mdi.decay.weight" in names and "recurrence.conv.weight" in names
    for name, param in block.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().max() > 0, name


def test_state_is_fixed_size_and_round_trips_through_a_file(tmp_path):
    model = toy()
    ids = torch.randint(0, 50, (2, 31))
    with torch.no_grad():
        out = model(ids[:, :19])
        sizes = {model(torch.randint(0, 50, (2, n))).state.nbytes() for n in (7, 21, 84)}  # whole memory chunks: the chunk in progress is empty
        out.state.save(tmp_path / "state.safetensors")
        loaded = State.load(tmp_path / "state.safetensors", model)
        continued = model(ids[:, 19:], state=loaded).logits
        expected = model(ids[:, 19:], state=out.state).logits
    assert len(sizes) == 1 and loaded.nbytes() == out.state.nbytes()
    assert torch.equal(loaded.layers[1]["h"]["matrix"], out.state.layers[1]["h"]["matrix"])
    torch.testing.assert_close(continued, expected, rtol=0, atol=0)


@pytest.mark.parametrize("prompt", [1, 5, 9])
def test_static_decode_equals_one_pass_and_hands_back_the_state(prompt, tmp_path):
    model = toy()
    ids = torch.randint(0, 50, (3, prompt + 20))
    with torch.no_grad():
        whole = model(ids).logits
        start = model(ids[:, :prompt]).state
        kept = start.layers[0]["h"]["matrix"].clone()
        decoder = StaticDecoder(model, start, cuda_graph=False)
        steps = torch.stack([decoder.step(ids[:, t : t + 1]).clone() for t in range(prompt, prompt + 12)], 1)
        handed_back = decoder.state()
        rest = model(ids[:, prompt + 12 :], state=handed_back).logits
        eager = model(ids[:, : prompt + 12]).state
    assert rel_err(steps, whole[:, prompt : prompt + 12]) < 1e-12
    assert rel_err(rest, whole[:, prompt + 12 :]) < 1e-12
    for mine, theirs in zip(handed_back.layers, eager.layers):
        for key in ("matrix", "conv"):
            assert rel_err(mine["h"][key], theirs["h"][key]) < 1e-12, key
    # the decoder's buffers are copies: the state it started from is untouched
    assert torch.equal(start.layers[0]["h"]["matrix"], kept) and handed_back.nbytes() == eager.nbytes()


def test_bf16_intermediates_stay_near_float32_ones_and_float64_ignores_them():
    """``intermediates: "bfloat16"`` changes only how the chunked form stores its matrices:
    logits near the float32 layout's with the same weights, gradients everywhere; a float64
    model (tests, references) keeps float64 throughout."""
    torch.manual_seed(0)
    full = toy(torch.float32)
    half = toy(torch.float32, recurrence={"kind": "delta", "chunk": 5, "intermediates": "bfloat16"})
    half.load_state_dict(full.state_dict())
    tokens = torch.randint(0, 50, (2, 23))
    want, got = full(tokens).logits, half(tokens).logits
    assert 0 < rel_err(got, want) < 2e-2
    got.square().mean().backward()
    for name, param in half.blocks[0].recurrence.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().max() > 0, name
    full64, half64 = full.double(), half.double()
    assert torch.equal(half64(tokens).logits, full64(tokens).logits)


def test_bf16_intermediates_stream_as_one_pass_to_bf16_precision():
    """What ``small``, ``1b`` and ``7b`` run (bf16 intermediates) in a float32 model: pieces
    with a carried state (1-token steps among them) agree with one pass to bf16's precision,
    not float32's, since the pieces cut the chunks elsewhere; the state keeps its size and
    float32."""
    torch.manual_seed(1)
    model = toy(torch.float32, recurrence={"kind": "delta", "chunk": 5, "intermediates": "bfloat16"})
    ids = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        whole = model(ids).logits
        pieces, state, start = [], None, 0
        for size in random_split(40, random.Random(3)):
            out = model(ids[:, start : start + size], state=state)
            pieces.append(out.logits)
            state, start = out.state, start + size
    assert 1e-4 < rel_err(torch.cat(pieces, 1), whole) < 2e-2  # float32 intermediates: about 5e-7
    matrix = state.layers[0]["h"]["matrix"]
    assert matrix.shape == (2, 4, 6, 6) and matrix.dtype == torch.float32


def test_bfloat16_model_keeps_a_float32_matrix_state():
    model = toy(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 23))
    with torch.no_grad():
        out = model(ids)
        step = model(ids[:, :1], state=out.state)
    reference = toy(torch.float64)
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        want = reference(ids).logits
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(step.logits).all()
    assert out.state.layers[0]["h"]["matrix"].dtype == torch.float32
    assert rel_err(out.logits, want) < 5e-2


@pytest.mark.slow
def test_model_compiles_fullgraph():
    model = toy(torch.float32)
    ids = torch.randint(0, 50, (2, 19))  # delta chunks of 5: three whole and a partial one
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # any graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_meta_device_build_is_fully_initialised():
    """Training builds on the meta device and calls ``reset_parameters``: every parameter of
    the delta block (the convolution's taps, the per-head MDI) must be set by it."""
    with torch.device("meta"):
        model = toy(torch.float32)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    model.reset_parameters(seed=3)
    assert model.parameters_left_to_constructor() == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_chunk_past_the_kernels_shared_memory_is_refused_by_validation():
    # 128-token chunks at head width 128 asked the Triton scan for 272 KiB of shared memory on
    # an H200 and failed at the first step; the recipe refuses such tiles up front, for the
    # recurrence and the delta memory alike (same kernel)
    wide_heads = ["model.n_heads=1", "model.memory.banks=1"]  # tiny's d_model 128 in one head
    for field, variant in (("recurrence", "model.recurrence.kind=delta"), ("memory", 'model.memory={"kind": "delta"}')):
        with pytest.raises(ValueError, match=rf"{field}\.chunk 128 at head width 128: .* at most 64"):
            mmrec.recipes.load("tiny", [*wide_heads, variant, f"model.{field}.chunk=128"])
        assert getattr(mmrec.recipes.load("tiny", [*wide_heads, variant, f"model.{field}.chunk=64"]).model, field).chunk == 64
    # narrower heads leave room for longer chunks (tiny's own layer 0 is one head of 128: left out)
    narrow = ["model.layer_overrides=[]", "model.recurrence.kind=delta", "model.recurrence.chunk=128"]
    assert mmrec.recipes.load("tiny", narrow).model.recurrence.chunk == 128


def test_the_chunk_check_pads_as_the_kernel_does():
    from mmrec.ops.delta_rule import check_chunk

    check_chunk(64, 128, "recurrence.chunk")
    check_chunk(48, 100, "recurrence.chunk")  # padded to 64 x 128
    with pytest.raises(ValueError, match="use a chunk of at most 16"):
        check_chunk(32, 512, "recurrence.chunk")
    # an 8-token chunk still takes a 16-row tile (tl.dot's smallest), so width 1024 does not fit
    with pytest.raises(ValueError, match="too wide even for 16-token chunks"):
        check_chunk(8, 1024, "recurrence.chunk")

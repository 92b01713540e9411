"""The ``window`` memory against a dense float64 reference, in pieces, in static decoding,
and inside a model."""

import random
from pathlib import Path

import pytest
import torch

import mmrec
from mmrec.decode import StaticDecoder, supports_static
from mmrec.layers.window_memory import WindowMemory
from mmrec.state import State
from tests.helpers import assert_causal, eager_steps, rel_err

RECIPE = Path(__file__).resolve().parents[2] / "docs" / "results" / "recipes" / "tiny-window.json"


def make(d_model=24, n_heads=4, kv_heads=None, rope_base=50.0):
    config = WindowMemory.Config(kv_heads=kv_heads, rope_base=rope_base)
    return WindowMemory(config, d_model=d_model, n_heads=n_heads).double()


def inputs(memory, batch, length):
    widths = (memory.n_heads * memory.head_dim, memory.key_dim, memory.key_dim)
    return tuple(torch.randn(batch, length, w, dtype=torch.float64) for w in widths)


def reference(memory, q, k, v, chunk_size):
    """Dense T x T attention, written the naive way: token t sees s iff s <= t and s is in
    t's chunk or the one before; RoPE at absolute positions; key/value head h // groups."""
    batch, length, _ = q.shape
    heads, kv_heads, dim = memory.n_heads, memory.kv_heads, memory.head_dim
    half = dim // 2
    freqs = memory.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs  # absolute positions

    def rope(x):  # [B, h, T, E]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], dim=-1)

    queries = rope(q.view(batch, length, heads, dim).transpose(1, 2))
    keys = rope(k.view(batch, length, kv_heads, dim).transpose(1, 2))
    values = v.view(batch, length, kv_heads, dim).transpose(1, 2)
    group = torch.arange(heads) // (heads // kv_heads)
    scores = queries @ keys[:, group].transpose(-1, -2) / dim**0.5  # [B, H, T, T]
    t, s = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = (s <= t) & (s // chunk_size >= t // chunk_size - 1)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (weights @ values[:, group]).transpose(1, 2).reshape(batch, length, heads * dim)


@pytest.mark.parametrize("length,chunk,kv_heads", [(37, 8, None), (37, 8, 2), (16, 8, 1), (5, 8, None), (9, 1, 2)])
def test_matches_dense_reference_float64_with_gradients(length, chunk, kv_heads):
    memory = make(kv_heads=kv_heads)
    q, k, v = (x.requires_grad_() for x in inputs(memory, 2, length))
    context, state = memory(q, k, v, chunk)
    expected = reference(memory, q, k, v, chunk)
    assert rel_err(context, expected) < 1e-12
    probe = torch.randn_like(context)
    got = torch.autograd.grad((context * probe).sum(), (q, k, v))
    want = torch.autograd.grad((expected * probe).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12
    # the state: the last complete chunk and the tokens after it, unrotated
    full = length // chunk * chunk
    assert torch.equal(state["prev_k"], k[:, full - chunk : full] if full else k[:, :0])
    assert torch.equal(state["pending_v"], v[:, full:])


def test_gradcheck():
    memory = make(d_model=8, n_heads=2, kv_heads=1)
    q, k, v = (x.requires_grad_() for x in inputs(memory, 1, 7))
    assert torch.autograd.gradcheck(lambda q, k, v: memory(q, k, v, 3)[0], (q, k, v))
    # continuing a state: gradients reach the carried keys and values too
    state = {name: torch.randn(1, size, 4, dtype=torch.float64, requires_grad=True)
             for name, size in (("prev_k", 3), ("prev_v", 3), ("pending_k", 2), ("pending_v", 2))}
    assert torch.autograd.gradcheck(lambda q, k, v, *s: memory(q, k, v, 3, dict(zip(state, s)))[0], (q, k, v, *state.values()))


@pytest.mark.parametrize("split", [[1] * 19, [3, 1, 9, 6], [4, 4, 11], [2, 17], [6, 13], [19]])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_pieces_with_carried_state_equal_one_pass(split, kv_heads):
    memory = make(kv_heads=kv_heads)
    q, k, v = inputs(memory, 2, 19)
    whole, whole_state = memory(q, k, v, 4)
    pieces, state, start = [], None, 0
    for size in split:
        context, state = memory(q[:, start : start + size], k[:, start : start + size], v[:, start : start + size], 4, state)
        pieces.append(context)
        start += size
    assert rel_err(torch.cat(pieces, 1), whole) < 1e-13
    assert state.keys() == whole_state.keys()
    for key in whole_state:
        assert torch.equal(state[key], whole_state[key]), key


@pytest.mark.parametrize("start", [3, 4, 10])  # before the first chunk completes, at a boundary, later
def test_static_step_equals_forward(start):
    memory = make(kv_heads=2)
    chunk, length = 4, 23
    q, k, v = inputs(memory, 2, length)
    with torch.no_grad():
        _, begin = memory(q[:, :start], k[:, :start], v[:, :start], chunk)
        expected, end = memory(q[:, start:], k[:, start:], v[:, start:], chunk, begin)
        static = memory.static_state(begin, 2, chunk, torch.float64)
        buffers = {name: t.data_ptr() for name, t in static.items()}
        got = []
        for t in range(start, length):  # crosses four or five chunk boundaries
            got.append(memory.step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], chunk, static, torch.tensor(t))[0])
            if t % chunk == chunk - 1:
                memory.complete_chunk(static)
    assert rel_err(torch.cat(got, 1), expected) < 1e-12
    assert {name: t.data_ptr() for name, t in static.items()} == buffers  # updated in place
    handed_back = memory.eager_state(static, length % chunk)
    assert handed_back.keys() == end.keys()
    for key in end:
        assert torch.equal(handed_back[key], end[key]), key


def test_config_checks_the_model():
    with pytest.raises(mmrec.recipes.RecipeError, match=r"memory\.kv_heads \(3\) must divide n_heads \(4\)"):
        mmrec.recipes.load("tiny", ['model.memory={"kind": "window", "kv_heads": 3}'])
    with pytest.raises(mmrec.recipes.RecipeError, match="even head width"):
        mmrec.recipes.load("tiny", ["model.n_heads=128", 'model.memory={"kind": "window"}'])


# -- inside a model --------------------------------------------------------------------------


def toy(dtype=torch.float64, chunk_size=7, **memory):
    model = {"arch": "mmrec", "vocab_size": 50, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40,
             "chunk_size": chunk_size, "memory": {"kind": "window", **memory}}
    return mmrec.build({"name": "toy", "model": model}).to(dtype).eval()


def static_logits(decoder, ids):
    return torch.stack([decoder.step(ids[:, t : t + 1]).clone() for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("t", [3, 6, 7, 19])  # within a chunk, at and after boundaries
def test_model_future_tokens_never_change_earlier_logits(t):
    assert_causal(toy(kv_heads=2), torch.randint(0, 50, (2, 31)), t, vocab=50)


def test_model_every_parameter_gets_a_gradient():
    model = toy(kv_heads=2).train()
    ids = torch.randint(0, 50, (2, 24))
    out = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().max() > 0, name


@pytest.mark.parametrize("trial", range(3))
def test_model_pieces_equal_one_pass(trial):
    model = toy()
    ids = torch.randint(0, 50, (2, 40))
    rng = random.Random(trial)
    with torch.no_grad():
        whole = model(ids).logits
        pieces, state, start = [], None, 0
        while start < 40:
            size = min(40 - start, rng.choice([1, 1, 2, 3, 6, 7, 9, 15]))
            out = model(ids[:, start : start + size], state=state)
            pieces.append(out.logits)
            state, start = out.state, start + size
    assert rel_err(torch.cat(pieces, 1), whole) < 1e-12


@pytest.mark.parametrize("prefix", [5, 21])  # before the first chunk completes (no previous chunk yet), later
def test_model_state_save_and_load_round_trip(prefix, tmp_path):
    model = toy()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        out = model(ids[:, :prefix])
        out.state.save(tmp_path / "state.safetensors")
        loaded = State.load(tmp_path / "state.safetensors", model)
        continued = model(ids[:, prefix:], state=loaded).logits
        expected = model(ids[:, prefix:], state=out.state).logits
        whole = model(ids).logits
    assert loaded.position == prefix
    torch.testing.assert_close(continued, expected, rtol=0, atol=0)
    assert rel_err(continued, whole[:, prefix:]) < 1e-12
    sizes = [model(torch.randint(0, 50, (1, n))).state.nbytes() for n in (14, 140)]
    assert sizes[0] == sizes[1]  # a fixed size once the first chunk is complete


@pytest.mark.parametrize("prompt", [1, 7, 10])  # one token, a whole chunk, mid-chunk
def test_model_static_steps_equal_one_pass_and_hand_back_the_eager_state(prompt):
    model = toy(kv_heads=2)
    assert supports_static(model)
    ids = torch.randint(0, 50, (3, prompt + 23))
    with torch.no_grad():
        whole = model(ids).logits
        decoder = StaticDecoder(model, model(ids[:, :prompt]).state, cuda_graph=False)
        steps = static_logits(decoder, ids[:, prompt:-4])
        handed_back, eager = decoder.state(), model(ids[:, :-4]).state
        continued = model(ids[:, -4:], state=handed_back).logits
    assert rel_err(steps, whole[:, prompt:-4]) < 1e-12
    assert rel_err(continued, whole[:, -4:]) < 1e-12
    for mine, theirs in zip(handed_back.layers, eager.layers):  # the same shapes, values to rounding
        for key in theirs["memory"]:
            assert mine["memory"][key].shape == theirs["memory"][key].shape, key
            assert rel_err(mine["memory"][key], theirs["memory"][key]) < 1e-12, key


def test_model_float32_static_steps_match_eager_steps_and_generate_agrees():
    model = toy(dtype=torch.float32)
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        out = model(ids[:, :11])
        static = static_logits(StaticDecoder(model, out.state, cuda_graph=False), ids[:, 11:])
        eager, _ = eager_steps(model, out.state, ids[:, 11:])
    assert rel_err(static, eager) < 1e-5
    model = model.double()
    prompt = ids[:, :12]
    assert torch.equal(mmrec.generate(model, prompt, 16, temperature=0, cuda_graph=True),
                       mmrec.generate(model, prompt, 16, temperature=0, cuda_graph=False))


def test_model_compiles_fullgraph():
    model = toy(dtype=torch.float32, kv_heads=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # any graph break is an error
    for length in (30, 5):  # several chunks; within the first
        ids = torch.randint(0, 50, (2, length))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_recipe_builds_and_trains():
    model = mmrec.build(str(RECIPE), ["model.n_layers=1"])
    assert type(model.blocks[0].memory) is WindowMemory
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, model.config.chunk_size + 10))  # one chunk and a partial one
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):  # one batch: the loss must fall
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

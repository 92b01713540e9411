"""The static decode step (mmrec.decode) against the eager step and full forward passes."""

import pytest
import torch

import mmrec
from mmrec.decode import StaticDecoder, supports_static
from mmrec.decode import _block_step as plain_block_step
from mmrec.state import State
from tests.helpers import eager_steps, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# odd sizes: a 7-token chunk, 3 sequences, 2 banks of 6-wide slots
ARCHS = [("mmrec", {}), ("mmrec", {"recurrence": {"kind": "exact"}}), ("mmrec", {"short_conv": 4, "short_conv_init": "random"}),
         ("transformer", {})]


def toy(arch="mmrec", dtype=torch.float64, **model):
    base = {"arch": arch, "vocab_size": 50, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40}
    if arch == "mmrec":
        base.update(chunk_size=7, memory={"kind": "hds", "slots": 16, "banks": 2, "dim": 6})
    return mmrec.build({"name": "toy", "model": {**base, **model}}).to(dtype).eval()


def static_logits(decoder, ids):
    return torch.stack([decoder.step(ids[:, t : t + 1]).clone() for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("options", [{"slots": 8, "levels": [0, 1]}, {"slots": 64, "levels": [0, 2, 3], "own_value": 0.1}])
def test_hds_memory_step_equals_forward(options):
    from mmrec.layers.hds_memory import HDSMemory

    slots = options["slots"]
    memory = HDSMemory(HDSMemory.Config(banks=3, dim=5, **options), d_model=12, n_heads=3).double()
    with torch.no_grad():  # random parameters well away from their init, and a random start
        for param in memory.parameters():
            param.normal_()
    batch, chunk, length = 2, 5, 17
    q, k, v = torch.randn(batch, length, 12).double(), torch.randn(batch, length, 15).double(), torch.randn(batch, length, 15).double()
    start = {"memory": torch.randn(batch, 3, slots, 5).double(), "pending_k": k[:, :3], "pending_v": v[:, :3]}
    with torch.no_grad():
        expected, end = memory(q[:, 3:], k[:, 3:], v[:, 3:], chunk, start)
        static = memory.static_state(start, batch, chunk, torch.float64)
        got = []
        for t in range(3, length):  # crosses three chunk boundaries
            got.append(memory.step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], chunk, static, torch.tensor(t))[0])
            if t % chunk == chunk - 1:
                memory.complete_chunk(static)
            # the cached keys and values are the ones of the memory now
            for cached, fresh in zip((static["keys"], static["values"]), memory.read_keys_values(static["memory"], torch.float64)):
                assert torch.equal(cached, fresh)
    assert rel_err(torch.cat(got, 1), expected) < 1e-12
    handed_back = memory.eager_state(static, length % chunk)
    assert rel_err(handed_back["memory"], end["memory"]) < 1e-12
    assert torch.equal(handed_back["pending_k"], end["pending_k"]) and torch.equal(handed_back["pending_v"], end["pending_v"])


@pytest.mark.parametrize("arch,extra", ARCHS)
@pytest.mark.parametrize("prompt", [1, 7, 10])  # one token, a whole chunk, mid-chunk
def test_static_steps_equal_one_pass(arch, extra, prompt):
    model = toy(arch, **extra)
    ids = torch.randint(0, 50, (3, prompt + 23))  # the steps cross three chunk boundaries
    with torch.no_grad():
        whole = model(ids).logits
        decoder = StaticDecoder(model, model(ids[:, :prompt]).state, max_length=ids.shape[1], cuda_graph=False)
        steps = static_logits(decoder, ids[:, prompt:])
    assert decoder.length == ids.shape[1] and int(decoder.position) == ids.shape[1]
    assert rel_err(steps, whole[:, prompt:]) < 1e-12


class _Replayer:
    """Stands in for a captured CUDA graph on CPU: replaying runs the step it was made for."""

    def __init__(self, decoder, complete):
        self.decoder, self.complete = decoder, complete

    def replay(self):
        self.decoder.replays.append((self.decoder.length, self.complete))
        self.decoder.logits[self.complete] = self.decoder._step(self.complete)


@pytest.mark.parametrize("prompt", [3, 7])
def test_chunk_completing_steps_replay_their_own_graph(prompt):
    model = toy()
    ids = torch.randint(0, 50, (3, prompt + 23))
    with torch.no_grad():
        whole = model(ids).logits
        decoder = StaticDecoder(model, model(ids[:, :prompt]).state, cuda_graph=False)
        decoder.graphs = {complete: _Replayer(decoder, complete) for complete in (False, True)}
        decoder.replays = []
        steps = static_logits(decoder, ids[:, prompt:])
    # the token at position p completes a chunk when p % 7 == 6: three times here
    assert decoder.replays == [(p, p % 7 == 6) for p in range(prompt, ids.shape[1])]
    assert sum(complete for _, complete in decoder.replays) == 3
    assert rel_err(steps, whole[:, prompt:]) < 1e-12
    for block, layer in zip(model.blocks, decoder.layers):  # the cached keys and values are the memory's
        fresh = block.memory.read_keys_values(layer["memory"]["memory"], torch.float64)
        assert rel_err(layer["memory"]["keys"], fresh[0]) < 1e-12 and rel_err(layer["memory"]["values"], fresh[1]) < 1e-12


def test_compiled_static_steps_equal_eager_static_steps():
    from torch._dynamo.utils import counters

    for arch in ("mmrec", "transformer"):
        compiled_frames = counters["frames"]["ok"]
        model = toy(arch, dtype=torch.float32)
        ids = torch.randint(0, 50, (3, 26))
        with torch.no_grad():
            state = model(ids[:, :5]).state
            plain = static_logits(StaticDecoder(model, state, max_length=26, cuda_graph=False), ids[:, 5:])
            decoder = StaticDecoder(model, state, max_length=26, cuda_graph=False, compile=True)
            compiled = static_logits(decoder, ids[:, 5:])  # crosses three chunk boundaries
        assert decoder._block_step is not plain_block_step and counters["frames"]["ok"] > compiled_frames  # it did compile
        assert rel_err(compiled, plain) < 1e-5, arch


def test_donated_transformer_cache_is_used_in_place():
    model = toy("transformer")
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        cache = model(ids[:, :7]).state
        # room for 25 more entries, NaN past the position: the decoder must zero them
        layers = [{name: torch.cat([layer[name], torch.full_like(layer[name][:, :, :1], float("nan")).expand(-1, -1, 25, -1)], 2)
                   for name in ("k", "v")} for layer in cache.layers]
        roomy = State(layers, cache.position, cache.model_config)
        decoder = StaticDecoder(model, roomy, max_length=30, cuda_graph=False, donate_state=True)
        assert decoder.layers[0]["k"].data_ptr() == layers[0]["k"].data_ptr() and decoder.capacity == 32
        donated = static_logits(decoder, ids[:, 7:])
        copied = static_logits(StaticDecoder(model, cache, max_length=30, cuda_graph=False, donate_state=True), ids[:, 7:])
    whole = model(ids).logits[:, 7:]
    assert rel_err(donated, whole) < 1e-12 and rel_err(copied, whole) < 1e-12  # a cache without room is copied


def test_split_kv_attention_equals_sdpa():
    model = toy("transformer")
    ids = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        state = model(ids[:, :9]).state
        sdpa = static_logits(StaticDecoder(model, state, max_length=40, cuda_graph=False), ids[:, 9:])
        split = static_logits(StaticDecoder(model, state, max_length=40, cuda_graph=False, kv_splits=8), ids[:, 9:])
        whole = model(ids).logits[:, 9:]
    assert rel_err(split, whole) < 1e-12 and rel_err(sdpa, whole) < 1e-12


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_float32_static_steps_match_eager_steps(arch, extra):
    model = toy(arch, dtype=torch.float32, **extra)
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        out = model(ids[:, :11])
        decoder = StaticDecoder(model, out.state, max_length=30, cuda_graph=False)
        static = static_logits(decoder, ids[:, 11:])
        eager, _ = eager_steps(model, out.state, ids[:, 11:])
    assert rel_err(static, eager) < 1e-5


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_handed_back_state_continues_eagerly_and_saves(arch, extra, tmp_path):
    model = toy(arch, **extra)
    ids = torch.randint(0, 50, (2, 36))
    with torch.no_grad():
        whole = model(ids).logits
        decoder = StaticDecoder(model, model(ids[:, :4]).state, max_length=36, cuda_graph=False)
        static_logits(decoder, ids[:, 4:19])  # ends mid-chunk, after two boundaries
        state = decoder.state()
        eager_state = model(ids[:, :19]).state
        assert state.position == 19 and state.nbytes() == eager_state.nbytes()
        for mine, theirs in zip(state.layers, eager_state.layers):
            for key, tensor in _flat(mine).items():
                assert tensor.shape == _flat(theirs)[key].shape
                assert rel_err(tensor, _flat(theirs)[key]) < 1e-12, key
        state.save(tmp_path / "state.safetensors")
        loaded = State.load(tmp_path / "state.safetensors", model)
        continued = model(ids[:, 19:], state=loaded).logits
        # and a second static decoder from the loaded state
        again = static_logits(StaticDecoder(model, loaded, max_length=36, cuda_graph=False), ids[:, 19:])
    assert rel_err(continued, whole[:, 19:]) < 1e-12
    assert rel_err(again, whole[:, 19:]) < 1e-12


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_generate_static_equals_eager(arch, extra):
    model = toy(arch, **extra)
    prompt = torch.randint(0, 50, (2, 12))
    greedy = mmrec.generate(model, prompt, 16, temperature=0, cuda_graph=False)
    assert torch.equal(mmrec.generate(model, prompt, 16, temperature=0, cuda_graph=True), greedy)
    sampled = mmrec.generate(model, prompt, 16, temperature=1.0, top_k=20, seed=3, cuda_graph=False)
    assert torch.equal(mmrec.generate(model, prompt, 16, temperature=1.0, top_k=20, seed=3, cuda_graph=True), sampled)
    assert not torch.equal(sampled, greedy)  # the sampled check is not a greedy one in disguise
    with torch.no_grad():
        state = model(prompt[:, :5]).state
    continued = mmrec.generate(model, prompt[:, 5:], 16, temperature=0, state=state, cuda_graph=True)
    assert torch.equal(continued, greedy[:, 5:])
    assert torch.equal(mmrec.generate(model, prompt[0], 1, temperature=0, cuda_graph=True), greedy[0, :13])


def test_full_static_cache_is_refused():
    model = toy("transformer")
    with torch.no_grad():
        decoder = StaticDecoder(model, model(torch.randint(0, 50, (1, 250))).state, max_length=251, cuda_graph=False)
        decoder.step(torch.tensor([[1]]))  # CACHE_ROUND gives room up to 256 tokens
        for _ in range(5):
            decoder.step(torch.tensor([[1]]))
        with pytest.raises(ValueError, match="full"):
            decoder.step(torch.tensor([[1]]))
        with pytest.raises(ValueError, match="max_length"):
            StaticDecoder(model, model(torch.randint(0, 50, (1, 3))).state)


def test_memory_without_a_static_step_falls_back_to_eager():
    pytest.importorskip("mmrec_fifo_memory")  # a plugin memory that has no static step
    fifo = toy(memory={"kind": "fifo", "slots": 16, "dim": 6})
    assert not supports_static(fifo)
    with pytest.raises(ValueError, match="no static decode step"):
        StaticDecoder(fifo, fifo(torch.randint(0, 50, (1, 3))).state)
    prompt = torch.randint(0, 50, (1, 5))
    assert torch.equal(mmrec.generate(fifo, prompt, 4, temperature=0), mmrec.generate(fifo, prompt, 4, temperature=0, cuda_graph=False))


# the seeds' options, all on (docs/design.md, "Options from the seeds")
SEED_OPTIONS = ["model.gated_integration=true", "model.pe_dim=24", "model.memory.own_value=0.1", "model.memory.slots=64",
                "model.memory.levels=[0,1,2,3]"]


@cuda
@pytest.mark.parametrize("recipe,overrides", [("tiny", []), ("transformer-tiny", []), ("tiny", ["model.recurrence.kind=exact"]),
                                              ("tiny", ["model.recurrence.kind=delta"]), ("tiny", ['model.memory={"kind": "window"}']),
                                              ("tiny", ['model.memory={"kind": "delta"}']),
                                              ("1b", ["model.n_layers=2"]), ("tiny", SEED_OPTIONS)])
def test_cuda_graph_replays_equal_eager_steps(recipe, overrides):
    model = mmrec.build(recipe, overrides).cuda().eval()
    chunk = getattr(model.config, "chunk_size", 64)
    ids = torch.randint(0, model.config.vocab_size, (3, 2 * chunk + 9), device="cuda")
    prompt = chunk // 2 + 3
    with torch.no_grad():
        out = model(ids[:, :prompt])
        decoder = StaticDecoder(model, out.state, max_length=ids.shape[1])
        assert decoder.graph is not None
        graphed = static_logits(decoder, ids[:, prompt:])
        eager, state = eager_steps(model, out.state, ids[:, prompt:])
        handed_back = decoder.state()
    assert rel_err(graphed, eager) < 1e-4  # float32, crossing two chunk boundaries
    assert rel_err(model(ids[:, -1:], state=handed_back).logits, model(ids[:, -1:], state=state).logits) < 1e-4
    model.double()  # greedy tokens: float64, so that no near-tie of a random model flips
    prompt_ids = ids[:, :prompt]
    assert torch.equal(mmrec.generate(model, prompt_ids, 40, temperature=0),
                       mmrec.generate(model, prompt_ids, 40, temperature=0, cuda_graph=False))


@cuda
@pytest.mark.parametrize("recipe,overrides", [("tiny", []), ("transformer-tiny", []), ("1b", ["model.n_layers=2"]),
                                              ("tiny", SEED_OPTIONS)])
def test_cuda_graph_of_compiled_steps_equals_uncompiled(recipe, overrides):
    model = mmrec.build(recipe, overrides).cuda().eval()
    chunk = getattr(model.config, "chunk_size", 64)
    ids = torch.randint(0, model.config.vocab_size, (3, 2 * chunk + 9), device="cuda")
    prompt = chunk // 2 + 3
    with torch.no_grad():
        state = model(ids[:, :prompt]).state
        plain = static_logits(StaticDecoder(model, state, max_length=ids.shape[1]), ids[:, prompt:])
        decoder = StaticDecoder(model, state, max_length=ids.shape[1], compile=True)
        assert set(decoder.graphs) == ({False, True} if model.config.arch == "mmrec" else {False})
        compiled = static_logits(decoder, ids[:, prompt:])  # crosses two chunk boundaries
    assert rel_err(compiled, plain) < 1e-4  # float32


@cuda
def test_cuda_graph_bfloat16_logits_close():
    model = mmrec.build("tiny").cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 150), device="cuda")
    with torch.no_grad():
        whole = model(ids).logits.float()
        decoder = StaticDecoder(model, model(ids[:, :20]).state, max_length=150)
        graphed = static_logits(decoder, ids[:, 20:]).float()
    assert (graphed - whole[:, 20:]).abs().max() < 0.1


def test_decode_benchmark_runs_both_modes_on_cpu(tmp_path):
    import json

    from mmrec.bench.__main__ import main

    recipes = []
    for arch in ("mmrec", "transformer"):
        model = {"arch": arch, "vocab_size": 50, "d_model": 24, "n_layers": 1, "n_heads": 4, "ffn_dim": 40}
        if arch == "mmrec":
            model.update(chunk_size=7, memory={"kind": "hds", "slots": 16, "banks": 2, "dim": 6})
        recipes.append(tmp_path / f"{arch}.json")
        recipes[-1].write_text(json.dumps({"name": arch, "model": model}))
    out = tmp_path / "decode.json"
    assert main(["decode", "--recipes", *map(str, recipes), "--contexts", "10", "--batches", "2", "--steps", "2",
                 "--device", "cpu", "--dtype", "float32", "--kv-splits", "0", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["arch"], r["mode"], r["attention"]) for r in rows] == [
        ("mmrec", "eager", "-"), ("mmrec", "graph", "-"),
        ("transformer", "eager", "sdpa"), ("transformer", "graph", "sdpa"), ("transformer", "graph", "split4")]
    assert all(r["tokens_per_s"] > 0 and r["state_gib"] > 0 and not r["compiled"] for r in rows)
    assert rows[1]["chunk_end_ms"] > 0 and rows[1]["step_ms"] > 0
    assert all("speedup_vs_transformer" in r for r in rows if r["arch"] == "mmrec")

"""mmrec.contracts: the defaults a plain nn.Module variant gets, ChunkedMemory's helpers and
static decoding, and the memory example of docs/plugins.md against the conformance suite."""

import re
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

import mmrec
import mmrec.testing
from mmrec import contracts
from mmrec.contracts import Block, ChunkedMemory, Memory, Recurrence, with_defaults
from mmrec.decode import supports_static
from mmrec.layers.hds_memory import HDSMemory
from mmrec.ops import accumulation_dtype, linear_scan

DOC = Path(__file__).parents[1] / "docs" / "plugins.md"


class PlainRecurrence(nn.Module):
    """A recurrence written without the contract: ``h_t = γ_t h_{t-1} + s ⊙ z_t``."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["plain"] = "plain"

    def __init__(self, config, *, d_model, n_heads, init_std=0.02):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d_model))

    def init_weights(self):
        nn.init.ones_(self.scale)

    def forward(self, z, log_decay, gate, h0=None):
        acc = accumulation_dtype(z.dtype)
        return linear_scan(log_decay.exp(), self.scale.to(acc) * z.to(acc), h0)


class OwnDecay(PlainRecurrence):
    """Plain too, and says it has a decay of its own (a constant one)."""

    class Config(PlainRecurrence.Config):
        kind: Literal["own-decay"] = "own-decay"

    needs_decay = False

    def forward(self, z, log_decay, gate, h0=None):
        return super().forward(z, torch.full_like(z, -0.1), gate, h0)


def toy(**model):
    base = {"arch": "mmrec", "vocab_size": 50, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40, "chunk_size": 5,
            "memory": {"kind": "hds", "slots": 16, "banks": 2, "dim": 6}}
    return mmrec.build({"name": "toy", "model": {**base, **model}}).double().eval()


def test_a_plain_module_recurrence_gets_the_defaults_and_keeps_its_own():
    with mmrec.testing.registered("recurrences", PlainRecurrence):
        model = toy(recurrence={"kind": "plain"})
    block = model.blocks[0]
    assert isinstance(block.recurrence, PlainRecurrence) and isinstance(block.recurrence, Recurrence)
    assert type(block.recurrence).__name__ == "PlainRecurrence"
    # the defaults: no gate, MDI with one decay per channel, no extra projections, no FLOPs of its own
    assert "g" not in block.widths and block.recurrence_inputs == {}
    assert block.mdi is not None and block.recurrence.decay_width(24, 4) == 24
    assert block.recurrence.flops_per_token(64, 5) == 0.0
    assert "blocks.0.recurrence.scale" in model.state_dict()  # its parameters keep their names
    assert supports_static(model)
    with mmrec.testing.registered("recurrences", OwnDecay):
        assert toy(recurrence={"kind": "own-decay"}).blocks[0].mdi is None  # its own needs_decay wins


def test_a_plain_module_recurrence_passes_the_conformance_suite():
    report = mmrec.testing.check_variant("recurrences", PlainRecurrence, slow=False, checks=["pieces", "gradients", "static_decode"])
    assert report == {"pieces": "ok", "gradients": "ok", "static_decode": "ok"}


def test_with_defaults():
    assert with_defaults(HDSMemory, "memories") is HDSMemory  # already a Memory
    derived = with_defaults(PlainRecurrence, "recurrences")
    assert derived is with_defaults(PlainRecurrence, "recurrences")  # one class per plugin class
    assert issubclass(derived, PlainRecurrence) and issubclass(derived, Recurrence)
    assert derived.__qualname__ == PlainRecurrence.__qualname__ and derived.forward is PlainRecurrence.forward
    assert derived.needs_decay and not with_defaults(OwnDecay, "recurrences").needs_decay


class PlainMemory(nn.Module):
    key_dim = 4

    def forward(self, q, k, v, chunk_size, state=None, dropout=0.0):
        return q, {}


class PlainStaticMemory(PlainMemory):
    def static_state(self, state, batch, chunk_size, dtype=None):
        return {}

    def step(self, q, k, v, chunk_size, static, position):
        return q, static

    def complete_chunk(self, static):
        pass

    def eager_state(self, static, pending):
        return {}


class HalfStatic(ChunkedMemory):
    def read_step(self, q, static, index, chunk_size):
        return q


def test_static_decoding_needs_every_static_method():
    memory = with_defaults(PlainMemory, "memories")()
    assert isinstance(memory, Memory) and not memory.supports_static() and memory.flops_per_token(10, 5) == 0.0
    assert with_defaults(PlainStaticMemory, "memories")().supports_static()
    assert not HalfStatic().supports_static()  # read_step alone is not a static step
    assert HDSMemory(HDSMemory.Config(slots=16, dim=3), d_model=8, n_heads=2).supports_static()


def test_the_decoder_takes_only_blocks_that_follow_the_contract():
    class Plain(nn.Module):
        def supports_static(self):
            return True

    class Model(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.blocks = nn.ModuleList([block])

    class Static(Block):
        def supports_static(self):
            return True

    assert not supports_static(Model(Plain()))
    assert supports_static(Model(Static())) and not supports_static(Model(Block()))


@pytest.mark.parametrize("pending,length,chunk", [(0, 7, 7), (0, 1, 4), (3, 1, 4), (2, 11, 4), (0, 13, 4), (3, 2, 5), (1, 8, 3)])
def test_chunked_queries_round_trip(pending, length, chunk):
    q = torch.randn(2, length, 3, dtype=torch.float64)
    chunks = ChunkedMemory.chunked_queries(q, pending, chunk)
    n = -(-(pending + length) // chunk)
    assert chunks.shape[:2] == (2, n) and chunks.shape[2] == (chunk if n > 1 else length)
    if n > 1:  # token t of the new ones sits at place pending + t of the chunked sequence, zeros elsewhere
        flat = chunks.flatten(1, 2)
        assert torch.equal(flat[:, pending : pending + length], q)
        assert not flat[:, :pending].any() and not flat[:, pending + length :].any()
    assert torch.equal(ChunkedMemory.unchunked(chunks, pending, length), q)
    k = torch.randn(2, pending + length, 3)
    full = ChunkedMemory.complete_chunks(k, chunk)
    assert full.shape == (2, (pending + length) // chunk, chunk, 3)
    assert torch.equal(full.flatten(1, 2), k[:, : full.shape[1] * chunk])


def test_chunked_memory_carries_the_chunk_in_progress():
    # a memory whose context is the mean value of the chunks completed so far (zeros before)
    class Mean(ChunkedMemory):
        key_dim = 3

        def initial_memory(self, batch, dtype, device=None):
            return {"sum": torch.zeros(batch, 3, dtype=dtype, device=device), "count": torch.zeros(batch, 1, dtype=dtype)}

        def attend(self, q, k, v, memory, chunk_size, pending, dropout):
            chunks = self.complete_chunks(v, chunk_size).mean(2)  # [B, n_full, 3]
            sums = torch.cat([memory["sum"][:, None], memory["sum"][:, None] + chunks.cumsum(1)], 1)
            counts = memory["count"][:, None] + torch.arange(chunks.shape[1] + 1, dtype=q.dtype)[:, None]
            means = sums / counts.clamp(min=1)  # [B, n_full + 1, 3]: what chunk i reads
            queries = self.chunked_queries(q, pending, chunk_size)
            context = means[:, : queries.shape[1], None].expand_as(queries)
            return self.unchunked(context, pending, q.shape[1]), {"sum": sums[:, -1], "count": counts[:, -1]}

    memory, chunk = Mean(), 4
    q, k, v = (torch.randn(2, 15, 3, dtype=torch.float64) for _ in range(3))
    expected = torch.zeros_like(q)
    for t in range(15):
        done = t // chunk  # chunks completed before token t's
        if done:
            expected[:, t] = v[:, : done * chunk].unflatten(1, (done, chunk)).mean(2).mean(1)
    whole, state = memory(q, k, v, chunk)
    assert torch.allclose(whole, expected)
    assert torch.equal(state["pending_k"], k[:, 12:]) and torch.equal(state["pending_v"], v[:, 12:])
    pieces, state, start = [], None, 0
    for size in (3, 1, 6, 2, 3):  # ends mid-chunk, crosses borders
        out, state = memory(q[:, start : start + size], k[:, start : start + size], v[:, start : start + size], chunk, state)
        pieces.append(out)
        start += size
    assert torch.allclose(torch.cat(pieces, 1), expected)
    assert state.keys() == {"sum", "count", "pending_k", "pending_v"}


def test_chunked_memory_hands_document_starts_aligned_with_the_chunk_in_progress():
    class Recording(ChunkedMemory):
        key_dim = 2
        supports_resets = True

        def initial_memory(self, batch, dtype, device=None):
            return {}

        def attend(self, q, k, v, memory, chunk_size, pending, dropout, *, resets=None):
            seen.append((pending, k, resets))
            return q, {}

    seen, memory, chunk = [], Recording(), 4
    k = torch.randn(2, 14, 2)
    resets = torch.rand(2, 14) < 0.3
    state, start = None, 0
    for size, given in ((3, False), (2, True), (6, True), (3, False)):  # starts carried into a call without them
        piece = slice(start, start + size)
        _, state = memory(k[:, piece], k[:, piece], k[:, piece], chunk, state, resets=resets[:, piece] if given else None)
        pending, seen_k, seen_resets = seen[-1]
        assert torch.equal(seen_k, k[:, start - pending : start + size])
        if start == 0:  # no starts given, none carried: attend is called as without resets
            assert seen_resets is None and "pending_resets" not in state
        else:  # the chunk in progress's starts (none for the first piece's tokens), then the new ones
            want = resets[:, start - pending : start + size].clone()
            want[:, : max(0, 3 - (start - pending))] = False
            if not given:
                want[:, pending:] = False
            assert torch.equal(seen_resets, want)
            done = (start + size) // chunk * chunk
            assert torch.equal(state["pending_resets"], want[:, done - (start - pending):])
        start += size


# --- the memory example of docs/plugins.md ---------------------------------------------------


@pytest.fixture
def average(monkeypatch) -> type:
    """The class ``ChunkAverage`` of the page's ``mmrec_average`` module, importable while the test runs."""
    blocks = dict(re.findall(r"^```python file=(\S+)\n(.*?)^```", DOC.read_text(), re.S | re.M))
    module = types.ModuleType("mmrec_average")
    exec(compile(blocks["mmrec-average/mmrec_average/__init__.py"], str(DOC), "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)  # torch.compile imports the module by name
    return module.ChunkAverage


def test_the_docs_memory_example_passes_every_check(average):
    assert issubclass(average, contracts.ChunkedMemory)
    report = mmrec.testing.check_variant("memories", average, {"decay": 0.8}, slow=False)
    assert report.pop("resets").startswith("takes no document resets, and says so")  # the example leaves them out
    assert report == {name: "ok" for name in mmrec.testing.CHECKS if name not in ("compile", "resets")}  # static_decode included


@pytest.mark.slow
def test_the_docs_memory_example_compiles(average):
    assert mmrec.testing.check_variant("memories", average, checks=["compile"], compile_backend="aot_eager") == {"compile": "ok"}


def test_the_docs_memory_example_equals_a_loop_over_chunks(average):
    memory = average(average.Config(decay=0.7), d_model=6, n_heads=2).double()
    chunk, length = 4, 14
    q, k, v = (torch.randn(2, length, 6, dtype=torch.float64) for _ in range(3))
    decay = torch.sigmoid(memory.decay_logit)
    average, expected = torch.zeros(2, 12, dtype=torch.float64), []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        keys, values = average[:, :6].unflatten(-1, (2, 3)), average[:, 6:].unflatten(-1, (2, 3))
        heads = q[:, start:stop].unflatten(-1, (2, 3))  # [B, L, 2, 3]
        gate = torch.sigmoid((heads * keys[:, None]).sum(-1, keepdim=True) / 3**0.5)
        expected.append((gate * values[:, None]).flatten(-2))
        if stop - start == chunk:
            average = decay * average + (1 - decay) * torch.cat([k[:, start:stop].mean(1), v[:, start:stop].mean(1)], -1)
    context, state = memory(q, k, v, chunk)
    assert torch.allclose(context, torch.cat(expected, 1), atol=1e-12)
    assert torch.allclose(state["average"], average, atol=1e-12)


def test_a_method_left_out_is_named():
    class Unfinished(ChunkedMemory):
        key_dim = 3

        def initial_memory(self, batch, dtype, device=None):
            return {}

    x = torch.zeros(1, 2, 3)
    with pytest.raises(NotImplementedError, match=r"Unfinished must implement attend \(see mmrec.contracts.ChunkedMemory.attend\)"):
        Unfinished()(x, x, x, 4)
    assert Unfinished().initial_state(2, torch.float64)["pending_k"].shape == (2, 0, 3)  # an empty memory is fine

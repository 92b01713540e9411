import json
import subprocess
import sys

import pytest
import torch

import mmrec
import mmrec.testing
from mmrec import registry
from mmrec_fifo_memory import FIFOMemory


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(memory, q, k, v, chunk_size):
    """A plain loop over chunks: read the queue, then push the chunk's summary."""
    queue = [memory.initial[:, i] for i in range(memory.slots)]  # oldest first, each [banks, dim]
    out = []
    for start in range(0, q.shape[1], chunk_size):
        stop = min(start + chunk_size, q.shape[1])
        slots = torch.stack(queue[-memory.slots:], dim=1)  # [banks, slots, dim]
        out.append(memory.read(q[:, start:stop], slots.expand(q.shape[0], -1, -1, -1)))
        keys = k[:, start:stop].unflatten(-1, (memory.banks, memory.dim)).transpose(1, 2)
        values = v[:, start:stop].unflatten(-1, (memory.banks, memory.dim)).transpose(1, 2)
        weights = (memory.summary_query @ keys.transpose(-1, -2) / memory.dim ** 0.5).softmax(-1)
        if stop - start == chunk_size:
            queue.append((weights @ values)[:, :, 0][0])  # batch of one
    return torch.cat(out, 1)


def test_matches_chunk_loop_float64_with_gradients():
    memory = FIFOMemory(FIFOMemory.Config(slots=3, banks=2, dim=5), d_model=12, n_heads=4).double()
    q = torch.randn(1, 29, 12, dtype=torch.float64)
    k, v = torch.randn(1, 29, 10, dtype=torch.float64), torch.randn(1, 29, 10, dtype=torch.float64)
    context, _ = memory(q, k, v, chunk_size=4)
    expected = reference(memory, q, k, v, 4)
    assert rel_err(context, expected) < 1e-10
    probe = torch.randn_like(context)
    params = list(memory.parameters())
    for got, want in zip(torch.autograd.grad((context * probe).sum(), params), torch.autograd.grad((expected * probe).sum(), params)):
        assert rel_err(got, want) < 1e-9


@pytest.mark.parametrize("split", [[1] * 11, [3, 8], [4, 4, 3], [11]])
def test_pieces_with_carried_state_equal_one_pass(split):
    memory = FIFOMemory(FIFOMemory.Config(slots=2, banks=1, dim=4), d_model=8, n_heads=2).double()
    q, k, v = (torch.randn(2, 11, w, dtype=torch.float64) for w in (8, 4, 4))
    whole, _ = memory(q, k, v, 3)
    pieces, state, start = [], None, 0
    for size in split:
        out, state = memory(q[:, start:start + size], k[:, start:start + size], v[:, start:start + size], 3, state)
        pieces.append(out)
        start += size
    torch.testing.assert_close(torch.cat(pieces, 1), whole)


def test_registered_and_selectable_from_a_recipe():
    assert registry.entries("memories")["fifo"].package == "mmrec-fifo-memory"
    model = mmrec.build("tiny", ["model.memory={\"kind\": \"fifo\", \"slots\": 4, \"banks\": 2, \"dim\": 16}"])
    assert type(model.blocks[-1].memory).__name__ == "FIFOMemory"  # tiny's layer 0 has no memory
    assert '"fifo"' in json.dumps(mmrec.recipes.schema())
    with pytest.raises(mmrec.recipes.RecipeError, match=r"model\.memory\.slotz: unknown field"):
        mmrec.recipes.load("tiny", ["model.memory={\"kind\": \"fifo\", \"slotz\": 4}"])


def test_trains_with_the_training_command(tmp_path):
    cmd = [sys.executable, "-m", "mmrec.recipes.train", "--out", str(tmp_path / "run"),
           "--set", "model.memory={\"kind\": \"fifo\", \"slots\": 4, \"banks\": 2, \"dim\": 16}",
           "--set", "train.steps=6", "--set", "train.batch_size=4", "--set", "train.seq_len=128",
           "--set", "train.eval_every=6", "--set", "train.eval_batches=1", "--set", "train.sample_tokens=8"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = sorted((tmp_path / "run").glob("step_*/recipe.json"))
    assert saved, "no checkpoint was written"
    assert json.loads(saved[-1].read_text())["model"]["memory"]["kind"] == "fifo"


def test_banks_that_do_not_divide_the_heads_are_a_recipe_error():
    with pytest.raises(mmrec.recipes.RecipeError, match=r"memory\.banks \(3\) must divide n_heads \(4\)"):
        mmrec.recipes.load("tiny", ['model.memory={"kind": "fifo", "banks": 3}'])


@mmrec.testing.parametrize("memories", "fifo", {"slots": 2, "banks": 2, "dim": 6})
def test_conforms_to_the_variant_suite(check):
    # mmrec's conformance suite, one test per check, in a toy model with chunks of 6 tokens
    # (2 slots: the queue fills and drops summaries within the checks' 22-token sequences)
    note = check()
    if check.name == "static_decode":  # fifo has no static step: generate decodes eagerly
        assert note.startswith("no static decode step")

"""The ``none`` memory: no context, no state, and the block projects only MDI's ``k`` for it."""

from pathlib import Path

import pytest
import torch

import mmrec
from mmrec.decode import StaticDecoder
from mmrec.layers.mmrec_block import MMRecBlock
from mmrec.layers.no_memory import NoMemory
from mmrec.state import State

RECIPES = Path(__file__).resolve().parents[2] / "docs" / "results" / "recipes"


def config(**model):
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=64, chunk_size=4)
    return MMRecBlock.Config(**{**base, **model})


def test_the_block_projects_only_k_for_it_and_gets_no_context():
    block = MMRecBlock(config(memory={"kind": "none", "key_dim": 6}))
    assert {"q", "v"}.isdisjoint(block.proj.widths) and block.proj.widths["k"] == 6
    with_hds = MMRecBlock(config(memory={"kind": "hds", "slots": 16, "banks": 2, "dim": 4}))
    assert sum(p.numel() for p in block.parameters()) < sum(p.numel() for p in with_hds.parameters())
    k = torch.randn(3, 5, 6, dtype=torch.float64)
    context, state = block.memory(None, k, None, chunk_size=4)
    assert context is None and state == {}
    # nothing is added in its place: the block's output is the one a zero context gives
    block = block.double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out, _, _ = block(x)
    block.memory.forward = lambda q, k, v, chunk_size, state=None, dropout=0.0: (k.new_zeros(3, 5, 16), {})
    torch.testing.assert_close(block(x)[0], out, rtol=0, atol=0)


@pytest.mark.parametrize("widths", [{"q": 16}, {"k": 6, "z": 16}])
def test_a_memory_that_asks_for_no_k_or_other_names_is_refused(monkeypatch, widths):
    monkeypatch.setattr(NoMemory, "projection_widths", lambda self, d_model: widths)
    with pytest.raises(ValueError, match="may ask for q, k and v only, and must ask for a k of its key_dim"):
        MMRecBlock(config(memory={"kind": "none", "key_dim": 6}))


def test_a_saved_state_continues_in_static_decoding(tmp_path):
    """The empty memory state of a ``none`` layer leaves nothing in a saved State; the
    static decoder still starts from the loaded one and gives the eager logits."""
    torch.manual_seed(0)
    model = mmrec.build(RECIPES / "tiny-hybrid-first-nomem.json", ["model.vocab_size=64", "model.d_model=32",
                                                                    "model.n_heads=2", "model.ffn_dim=64"]).eval()
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        state = model(ids[:, :18]).state
        state.save(tmp_path / "state")
        loaded = State.load(tmp_path / "state", model)
        decoder = StaticDecoder(model, loaded, cuda_graph=False)
        torch.testing.assert_close(decoder.step(ids[:, 18:]), model(ids).logits[:, -1])


def test_a_hybrid_with_memoryless_delta_layers_trains_a_step():
    """``tiny-hybrid-first-nomem``: layer 0 ``delta`` + ``none``, the rest ``parallel`` + ``hds``."""
    torch.manual_seed(0)
    model = mmrec.build(RECIPES / "tiny-hybrid-first-nomem.json", ["model.vocab_size=64", "model.d_model=32",
                                                                    "model.n_heads=2", "model.ffn_dim=64"])
    assert type(model.blocks[0].memory) is NoMemory and type(model.blocks[1].memory) is not NoMemory
    ids = torch.randint(0, 64, (2, 40))
    out = model(ids, targets=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # every parameter of the memoryless layer but the planning head (its loss is not asked for here)
    no_grad = [name for name, p in model.blocks[0].named_parameters()
               if not name.startswith("planning.") and (p.grad is None or not p.grad.any())]
    assert not no_grad

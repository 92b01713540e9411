"""The Transformer block's document resets: attention masked to each packed document."""

import pytest
import torch

from mmrec.documents import document_ids
from mmrec.layers.transformer_block import TransformerBlock
from tests.helpers import rel_err

T = 13


def block_and_inputs():
    config = TransformerBlock.Config(vocab_size=7, d_model=12, n_layers=1, n_heads=3, ffn_dim=20)
    x = torch.randn(2, T, 12, dtype=torch.float64)
    resets = torch.zeros(2, T, dtype=torch.bool)
    resets[0, 5] = resets[0, 9] = True  # row 0: three documents; row 1: one
    return TransformerBlock(config).double(), x, resets


def test_transformer_block_isolates_documents():
    block, x, resets = block_and_inputs()
    assert block.supports_resets()
    x.requires_grad_(True)
    y = block(x, resets=resets)[0]
    assert rel_err(y[:1, 5:9], block(x[:1, 5:9].detach())[0]) < 1e-12
    assert rel_err(y[:1, 9:], block(x[:1, 9:].detach())[0]) < 1e-12
    grad = torch.autograd.grad(y[0, 9:].sum(), x)[0]
    assert torch.equal(grad[0, :9], torch.zeros(9, 12, dtype=torch.float64)) and grad[0, 9:].abs().min() > 0


@pytest.mark.parametrize("cuts", [(4, 9), (5, 10)])
def test_transformer_block_pieces_with_resets_equal_one_pass(cuts):
    block, x, resets = block_and_inputs()
    whole, state, _ = block(x, resets=resets)
    outputs, piece_state = [], None
    for start, stop in zip((0, *cuts), (*cuts, T)):
        y, piece_state, _ = block(x[:, start:stop], piece_state, position=start, resets=resets[:, start:stop])
        outputs.append(y)
    assert rel_err(torch.cat(outputs, 1), whole) < 1e-12
    assert torch.equal(piece_state["doc"][:, :T], state["doc"])


def test_transformer_block_static_steps_continue_the_last_document():
    block, x, resets = block_and_inputs()
    whole, state, _ = block(x, resets=resets)
    _, prefill, _ = block(x[:, :10], resets=resets[:, :10])
    static = block.static_state(prefill, batch=2, position=10, max_length=T)
    steps = [block(x[:, t : t + 1], static, position=torch.tensor(t))[0] for t in range(10, T)]
    assert rel_err(torch.cat(steps, 1), whole[:, 10:]) < 1e-12
    handed_back = block.eager_state(static, T)
    assert torch.equal(handed_back["doc"], document_ids(resets))
    assert rel_err(handed_back["k"], state["k"]) < 1e-12
    with pytest.raises(ValueError, match="static decode step"):
        block(x[:, :1], static, position=torch.tensor(T), resets=resets[:, :1])

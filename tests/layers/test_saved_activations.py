"""The saved-activation counter of ``mmrec.bench block`` and the budget it sets the MM-Rec block."""

import pytest
import torch

from mmrec.bench.block import block_parts, partitioned, saved_bytes_per_token, shrunk


class _Square(torch.nn.Module):
    """Saves exactly its input (``x * x``), plus a parameter that must not count."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, return_aux_loss=False):
        return (x * x) * self.scale


def test_counter_counts_each_saved_storage_once_without_parameters():
    x = torch.randn(3, 5, 7, requires_grad=True)
    # x * x saves x twice (one storage), the product and the parameter: 2 storages of 3*5*7 floats
    assert saved_bytes_per_token(_Square(), x) == 2 * 7 * 4


def test_mmrec_block_saves_less_than_before_and_stays_near_the_transformer():
    """At the 1b shapes with widths / 16 (eager, bf16). Before the issue #6 changes (float32
    MDI and gate copies, a materialised keep, repeated memory keys) the MM-Rec block saved
    about 2.1x the Transformer block's bytes per token, 1.6x after the first round; now
    (bf16 log γ, bf16 scan states, a planning loss that keeps only bf16) about 1.38x. The
    ``parallel`` + ``hds`` block: layer 1 of the hybrid ``1b`` (its ``delta`` layers keep the
    chunk-local matrices of the delta rule, whose size does not shrink with the width)."""
    counts = {}
    for recipe, layer in (("1b", 1), ("transformer-1b", 0)):
        model = shrunk(recipe, 16, layer=layer).to(torch.bfloat16)
        x = torch.randn(1, 1024, model.config.d_model, dtype=torch.bfloat16, requires_grad=True)  # two chunks
        counts[recipe] = saved_bytes_per_token(model.blocks[0].train(), x)
    assert counts["1b"] < 1.45 * counts["transformer-1b"], counts


def test_partitioned_block_gives_the_eager_result():
    model = shrunk("tiny", 1)
    block = model.blocks[0].train()
    x = torch.randn(2, 40, model.config.d_model, requires_grad=True)
    want = block(x, return_aux_loss=True)[0]
    got = partitioned(block)(x, return_aux_loss=True)[0]
    torch.testing.assert_close(got, want)
    assert saved_bytes_per_token(partitioned(block), x) > 0


def test_the_one_block_of_a_hybrid_stack_is_the_named_layers():
    recipe = "docs/results/recipes/1b-hybrid.json"
    kinds = [type(shrunk(recipe, 16, layer=layer).blocks[0].recurrence).__name__ for layer in (0, 1)]
    assert kinds == ["DeltaRecurrence", "ParallelRecurrence"]
    with pytest.raises(ValueError, match="--layer 20: .* has layers 0 to 19"):
        shrunk(recipe, 16, layer=20)
    # without --layer: the first layer that keeps the model's own block (1b's layer 1)
    assert type(shrunk("1b", 16).blocks[0].recurrence).__name__ == "ParallelRecurrence"


@pytest.mark.parametrize("layer", [0, 1])
def test_the_parts_of_a_hybrid_layer_run(layer):
    """Each part's closure runs on a ``delta`` layer without memory (its recurrence takes the
    extra projections; the memory has nothing to backpropagate) and on a ``parallel`` one."""
    model = shrunk("docs/results/recipes/1b-hybrid-nomem.json", 64, layer=layer)
    x = torch.randn(1, 24, model.config.d_model)
    for step in block_parts(model.blocks[0], x).values():
        step()

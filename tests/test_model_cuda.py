"""The models on a GPU, through the Triton kernels: compiled whole, no graph breaks."""

import pytest
import torch

import mmrec
from tests.helpers import parameter_gradients, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("recipe,overrides", [
    ("tiny", []),
    ("1b", ["model.n_layers=2"]),  # 1b's two kinds of block (delta every 5 layers: layer 0); depth does not change what compiles
    ("tiny", ["model.recurrence.kind=exact"]),
    # a fused projection 2 heads wider than a multiple of 8: memory attention on unaligned views
    ("tiny", ["model.recurrence.kind=delta", "model.n_heads=2"]),
])
def test_compiles_fullgraph_on_cuda_without_graph_breaks(recipe, overrides):
    torch._dynamo.reset()
    model = mmrec.build(recipe, overrides).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 2 * model.config.chunk_size + 5), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(ids, return_aux_loss=True)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(ids, return_aux_loss=True)
        (out.logits.float().square().mean() + out.aux_loss).backward()
        reference = model(ids).logits
    assert torch.isfinite(out.logits).all()
    assert (out.logits.float() - reference.float()).abs().max() < 0.1  # bf16 logits
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cuda_matches_cpu_model():
    model = mmrec.build("tiny", ["model.n_layers=2"])
    ids = torch.randint(0, 256, (2, 150))
    expected = model(ids).logits
    got = model.cuda()(ids.cuda()).logits.cpu()
    assert ((got - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("overrides", [
    [], ["model.recurrence.kind=exact"], ["model.short_conv=4", "model.short_conv_init=random"],
], ids=["parallel", "exact", "short-conv"])
def test_cuda_compiled_gradients_match_the_cpu_model(overrides):
    # A finite gradient is not enough: compiled with PyTorch 2.11, every model once gave
    # finite but zero decay gradients (docs/notes/benchmark-history.md, 2026-11-26). So every
    # parameter's gradient is compared with the eager CPU model's, in float32.
    torch._dynamo.reset()
    model = mmrec.build("tiny", ["model.n_layers=2", "model.dropout=0.0", *overrides])
    ids = torch.randint(0, 256, (3, 2 * model.config.chunk_size + 6))
    expected = parameter_gradients(model, model, ids)
    model.cuda()
    got = parameter_gradients(model, torch.compile(model), ids.cuda())
    errors = {name: rel_err(got[name], g) for name, g in expected.items()}
    assert max(errors.values()) < 1e-3, sorted(errors.items(), key=lambda item: item[1])[-3:]

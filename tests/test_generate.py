import pytest
import torch

import mmrec
from mmrec.generate import _filter_logits, generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmrec.build("tiny", ["model.n_layers=1"]).eval()


def test_shapes_and_prompt_kept(model):
    prompt = torch.tensor([72, 105, 33])
    out = generate(model, prompt, 5, seed=0)
    assert out.shape == (8,) and out.dtype == torch.long and torch.equal(out[:3], prompt)
    batch = generate(model, prompt.repeat(2, 1), 4, seed=0)
    assert batch.shape == (2, 7)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(model):
    prompt = torch.tensor([1, 2, 3])
    state = torch.get_rng_state()
    a = generate(model, prompt, 6, temperature=1.0, top_p=0.9, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, generate(model, prompt, 6, temperature=1.0, top_p=0.9, seed=5))


def test_greedy_follows_the_argmax(model):
    prompt = torch.tensor([10, 20, 30, 40])
    out = generate(model, prompt, 3, temperature=0)
    ids = prompt[None]
    for _ in range(3):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids[0])
    assert torch.equal(out, generate(model, prompt, 3, top_k=1, seed=1))
    cropped = generate(model, prompt, 2, temperature=0, max_context=2)
    assert cropped.shape == (6,)


def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(_filter_logits(logits, 2, None)).tolist() == [[True, False, False, True]]
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03 for tokens 1, 2, 0, 3
    kept = ~torch.isinf(_filter_logits(logits, None, float(p[1] + 0.01)))
    assert kept.tolist() == [[False, True, True, False]]
    assert (~torch.isinf(_filter_logits(logits, None, 0.01))).sum() == 1


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.tensor([1]), 3, top_p=0.0)

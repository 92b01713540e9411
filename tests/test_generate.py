import pytest
import torch

import mmrec
from mmrec.generate import _filter_logits, generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmrec.build("tiny", ["model.n_layers=2"]).eval()


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


@pytest.mark.parametrize("recipe", ["tiny", "transformer-tiny"])
def test_stepwise_greedy_equals_greedy_by_full_passes(recipe):
    # float64, so that no near-tie flips between the two ways of computing the logits;
    # 50 + 30 tokens cross the tiny recipe's 64-token chunk boundary (layer 1's hds memory)
    model = mmrec.build(recipe, ["model.n_layers=2"]).double().eval()
    prompt = torch.randint(0, 256, (2, 50))
    out = generate(model, prompt, 30, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(30):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)
    assert torch.equal(out, generate(model, prompt, 30, top_k=1, seed=1))


def test_continues_a_saved_state(model, tmp_path):
    prompt = torch.randint(0, 256, (1, 30))
    whole = generate(model, prompt, 5, temperature=0)
    state = model(prompt[:, :20]).state
    state.save(tmp_path / "state.safetensors")
    loaded = mmrec.State.load(tmp_path / "state.safetensors", model)
    continued = generate(model, prompt[:, 20:], 5, temperature=0, state=loaded)
    assert torch.equal(continued[:, 10:], whole[:, 30:])


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


def test_generate_command_from_a_checkpoint(tmp_path, capsys):
    from mmrec.recipes import generate as cli
    from mmrec.recipes import train

    assert train.main(["--out", str(tmp_path / "run"), "--set", "model.n_layers=1", "--set", "train.steps=2",
                       "--set", "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.sample_tokens=0"]) == 0
    capsys.readouterr()
    state = tmp_path / "prompt.state"
    assert cli.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "The ", "--max-new-tokens", "7",
                     "--seed", "3", "--save-state", str(state)]) == 0
    first = capsys.readouterr().out
    assert first.startswith("The ") and state.is_file()
    assert cli.main(["--checkpoint", str(tmp_path / "run"), "--load-state", str(state), "--prompt", "x",
                     "--max-new-tokens", "3", "--temperature", "0"]) == 0
    capsys.readouterr()
    # the compiled static step (on CPU: without a graph), in bfloat16
    assert cli.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "The ", "--max-new-tokens", "5",
                     "--dtype", "bfloat16", "--compile"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    assert cli.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": -1}, r"max_new_tokens must be an integer >= 0, got -1"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer >= 0, got 2.5"),
    ({"max_new_tokens": True}, r"max_new_tokens must be an integer >= 0, got True"),
    ({"top_k": 0}, r"top_k must be None \(no limit\) or an integer >= 1, got 0"),
    ({"top_k": -3}, r"top_k must be .* >= 1, got -3"),
    ({"top_k": 2.0}, r"top_k must be .* integer >= 1, got 2.0"),
    ({"top_p": 0.0}, r"top_p must be None \(no limit\) or a number in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be .* in \(0, 1\], got 1.5"),
    ({"top_p": float("nan")}, r"top_p must be .*got nan"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0 .*got nan"),
    ({"temperature": float("inf")}, r"temperature must be a finite number >= 0 .*got inf"),
    ({"temperature": -0.5}, r"temperature must be a finite number >= 0 .*got -0.5"),
    ({"seed": "1"}, r"seed must be None or an integer, got '1'"),
])
def test_bad_sampling_options_name_the_argument_value_and_range(model, kwargs, message):
    args = {"max_new_tokens": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([1, 2]), **args)


def test_edge_values_are_accepted(model):
    prompt = torch.tensor([1, 2])
    assert torch.equal(generate(model, prompt, 0), prompt)  # no new tokens: the prompt
    assert generate(model, prompt, 2, top_k=1, top_p=1.0, temperature=0.0).shape == (4,)
    assert generate(model, prompt, 2, top_k=10_000, seed=0).shape == (4,)  # more than the vocabulary: no limit
    import numpy as np

    assert generate(model, prompt.int(), np.int64(2), temperature=np.float64(0.5), seed=np.int64(1)).shape == (4,)


@pytest.mark.parametrize("prompt,message", [
    (torch.tensor([1, 256, 3]), r"prompt_ids\[1\] is 256, outside the model's vocabulary \[0, 256\)"),
    (torch.tensor([[1, 2, 3], [4, 5, -1]]), r"prompt_ids\[1, 2\] is -1, outside the model's vocabulary \[0, 256\)"),
    (torch.tensor([1.0, 2.7]), r"prompt_ids must be an integer tensor of token ids, got dtype torch.float32"),
    (torch.tensor([True, False]), r"integer tensor .*torch.bool"),
    (torch.zeros(0, dtype=torch.long), r"non-empty .*got shape \(0,\)"),
    (torch.zeros(0, 3, dtype=torch.long), r"non-empty .*got shape \(0, 3\)"),
    (torch.zeros(1, 1, 2, dtype=torch.long), r"\[T\] or \[B, T\] .*got shape \(1, 1, 2\)"),
])
def test_bad_prompts_are_refused_up_front(model, prompt, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, 2)


def test_a_prompt_that_is_no_tensor_is_a_type_error(model):
    with pytest.raises(TypeError, match="prompt_ids must be a torch.Tensor of token ids, got list"):
        generate(model, [1, 2, 3], 2)


def test_a_state_of_another_batch_size_or_device_is_refused(model):
    with torch.no_grad():
        state = model(torch.randint(0, 256, (2, 5))).state
    with pytest.raises(mmrec.StateError, match="state has batch size 2 but prompt_ids has 1 row"):
        generate(model, torch.tensor([1, 2]), 2, state=state)
    with pytest.raises(mmrec.StateError, match="state is on meta but the model on cpu"):
        generate(model, torch.tensor([[1], [2]]), 2, state=state.to("meta"))
    with pytest.raises(ValueError, match="state must be a mmrec.State"):
        generate(model, torch.tensor([1, 2]), 2, state={"h": 1})
    assert generate(model, torch.tensor([[1], [2]]), 2, state=state, seed=0).shape == (2, 3)

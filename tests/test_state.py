import random

import pytest
import torch

import mmrec
from mmrec.state import State, StateError
from tests.helpers import rel_err


def toy(arch="mmrec", **model):
    base = {"arch": arch, "vocab_size": 50, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40}
    if arch == "mmrec":
        base.update(chunk_size=8, memory={"kind": "hds", "slots": 16, "banks": 2, "dim": 6})
    return mmrec.build({"name": "toy", "model": {**base, **model}}).eval()


def random_split(length, rng):
    sizes = []
    while length:
        size = min(length, rng.choice([1, 1, 2, 3, 5, 7, 8, 9, 13, 17]))
        sizes.append(size)
        length -= size
    return sizes


@pytest.mark.parametrize("arch,extra", [
    ("mmrec", {}), ("mmrec", {"recurrence": {"kind": "exact"}}), ("mmrec", {"short_conv": 4, "short_conv_init": "random"}), ("transformer", {}),
])
@pytest.mark.parametrize("trial", range(3))
def test_pieces_with_carried_state_equal_one_pass(arch, extra, trial):
    model = toy(arch, **extra)
    ids = torch.randint(0, 50, (2, 45))
    with torch.no_grad():
        whole = model(ids).logits
        pieces, state, start = [], None, 0
        for size in random_split(45, random.Random(trial)):
            out = model(ids[:, start:start + size], state=state)
            pieces.append(out.logits)
            state, start = out.state, start + size
    assert state.position == 45
    assert rel_err(torch.cat(pieces, 1), whole) < 1e-5


def test_state_size_does_not_grow_with_length():
    model = toy()
    with torch.no_grad():
        sizes = [model(torch.randint(0, 50, (1, n))).state.nbytes() for n in (16, 160, 1600)]
    assert sizes[0] == sizes[1] == sizes[2]


def test_long_input_runs_in_pieces_without_gradients():
    model = toy()
    ids = torch.randint(0, 50, (1, 100))
    with torch.no_grad():
        whole = model(ids).logits
        model.stream_piece = 13
        pieced = model(ids)
    assert pieced.state.position == 100
    assert rel_err(pieced.logits, whole) < 1e-5


def test_save_and_load_round_trip(tmp_path):
    model = toy()
    ids = torch.randint(0, 50, (2, 29))
    with torch.no_grad():
        out = model(ids[:, :21])
        out.state.save(tmp_path / "state.safetensors")
        loaded = State.load(tmp_path / "state.safetensors", model)
        assert loaded.position == 21
        continued = model(ids[:, 21:], state=loaded).logits
        expected = model(ids[:, 21:], state=out.state).logits
    torch.testing.assert_close(continued, expected, rtol=0, atol=0)


def test_state_from_another_recipe_is_refused(tmp_path):
    model, other = toy(), toy(d_model=32)
    with torch.no_grad():
        state = model(torch.randint(0, 50, (1, 10))).state
    state.save(tmp_path / "state.safetensors")
    with pytest.raises(StateError, match="d_model: state 24 vs model 32"):
        State.load(tmp_path / "state.safetensors", other)
    with pytest.raises(StateError, match="another config"):
        other(torch.randint(0, 50, (1, 3)), state=state)


def test_damaged_state_file_is_refused(tmp_path):
    path = tmp_path / "state.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(StateError, match="cannot read"):
        State.load(path)

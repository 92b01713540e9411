import random
import warnings
from pathlib import Path

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


def test_empty_subtrees_survive_the_round_trip_and_the_checksum_covers_them(tmp_path):
    """A variant with nothing to carry (the `none` memory's {}) keeps its place in the tree."""
    layers = [{"h": torch.ones(2, 3), "memory": {}}, {"h": torch.zeros(2, 3), "memory": {"kv": {}, "m": torch.ones(1)}}]
    path = tmp_path / "state.safetensors"
    State(layers, 5, "{}").save(path)
    loaded = State.load(path)
    assert loaded.layers[0]["memory"] == {} and loaded.layers[1]["memory"]["kv"] == {}
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'0.memory', b'1.memory', 1))  # same length, another layer's subtree
    with pytest.raises(StateError, match="checksum mismatch"):
        State.load(path)


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


def saved_state(tmp_path, name="state.safetensors"):
    model = toy()
    with torch.no_grad():
        state = model(torch.randint(0, 50, (2, 13))).state
    path = tmp_path / name
    state.save(path)
    return model, state, path


def data_section_start(path):
    raw = path.read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_the_tensor_data_is_refused(tmp_path, where):
    model, _, path = saved_state(tmp_path)
    raw = bytearray(path.read_bytes())
    start = data_section_start(path)
    offset = {"first": start, "middle": (start + len(raw)) // 2, "last": len(raw) - 1}[where]
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match=r"state.safetensors' is corrupted: checksum mismatch"):
        State.load(path, model)


def test_a_changed_metadata_field_is_refused(tmp_path):
    model, _, path = saved_state(tmp_path)
    raw = path.read_bytes()
    assert raw.count(b'"position":"13"') == 1
    path.write_bytes(raw.replace(b'"position":"13"', b'"position":"93"'))  # same length, header still valid
    with pytest.raises(StateError, match="checksum mismatch"):
        State.load(path, model)


def test_a_truncated_state_file_is_refused(tmp_path):
    model, _, path = saved_state(tmp_path)
    raw = path.read_bytes()
    for length in (len(raw) - 1, data_section_start(path), 100, 4, 0):
        path.write_bytes(raw[:length])
        with pytest.raises(StateError, match="cannot read state file .*state.safetensors"):
            State.load(path, model)


def test_a_version_1_file_loads_with_a_warning(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, state, path = saved_state(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    metadata = {k: v for k, v in metadata.items() if k != "sha256"} | {"version": "1"}
    old = tmp_path / "v1.safetensors"
    save_file(load_file(str(path)), str(old), metadata=metadata)
    with pytest.warns(UserWarning, match="format version 1.*no checksum"):
        loaded = State.load(old, model)
    assert loaded.position == state.position
    torch.testing.assert_close(loaded.layers, state.layers, rtol=0, atol=0)
    # saving it again gives a current file, with a checksum
    loaded.save(tmp_path / "v2.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        State.load(tmp_path / "v2.safetensors", model)


def test_newer_or_missing_checksum_or_bad_versions_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, _, path = saved_state(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    cases = [({"version": "3"}, "version 3 .*newer mmrec"), ({"version": "x"}, "is corrupted: .*version 'x'"),
             ({"sha256": None}, "is corrupted: its checksum .* missing"), ({"format": "other"}, "not an mmrec state file")]
    for change, message in cases:
        bad = {k: v for k, v in (metadata | change).items() if v is not None}
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
        with pytest.raises(StateError, match=message):
            State.load(tmp_path / "bad.safetensors", model)


def test_save_into_a_missing_folder_names_it(tmp_path):
    _, state, _ = saved_state(tmp_path)
    target = tmp_path / "no" / "such" / "state.safetensors"
    with pytest.raises(StateError, match=r"cannot write state file .*state.safetensors'.*folder .*such' does not exist"):
        state.save(target)
    assert not (tmp_path / "no").exists()  # not created behind the user's back
    with pytest.raises(StateError, match="is a folder"):
        state.save(tmp_path)


def test_save_failure_is_a_state_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import mmrec.state as state_module

    _, state, path = saved_state(tmp_path)
    before = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module, "save_file", failing_save_file)
    with pytest.raises(StateError, match=r"cannot write state file .*state.safetensors'.*No space left"):
        state.save(path)
    assert path.read_bytes() == before  # the existing file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]  # no temporary left


def test_save_never_touches_other_files_and_can_refuse_to_overwrite(tmp_path):
    _, state, path = saved_state(tmp_path)
    bystander = tmp_path / "state.safetensors.tmp"  # the old temporary name
    bystander.write_text("mine")
    state.save(path)
    assert bystander.read_text() == "mine"
    with pytest.raises(StateError, match="already exists"):
        state.save(path, overwrite=False)
    state.save(tmp_path / "new.safetensors", overwrite=False)


def test_loads_onto_the_requested_device_after_checking(tmp_path):
    model, _, path = saved_state(tmp_path)
    loaded = State.load(path, model, device="meta")
    assert all(t.device.type == "meta" for layer in loaded.layers for t in mmrec.state._flatten(layer).values())

import json
import random

import pytest
import torch
from safetensors import safe_open

import mmrec
from mmrec import checkpoint as ck
from mmrec.checkpoint import CheckpointError
from mmrec.tokenizer import ByteTokenizer


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.lin = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: safetensors must cope with shared tensors


@pytest.fixture
def recipe():
    return mmrec.recipes.load("tiny", ["model.n_layers=2"])  # both of tiny's kinds of block


def _save(run, step, model, recipe, keep_last=None):
    state = {"step": step, "rng": ck.rng_state(), "data": {"samples_seen": step}}
    return ck.save_checkpoint(run, step, model, recipe, state, ByteTokenizer(), keep_last)


def test_round_trip(tmp_path, recipe):
    model = Tiny()
    path = _save(tmp_path, 7, model, recipe)
    assert path == tmp_path / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "recipe.json", "trainer.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["recipe"]) == json.loads(recipe.model_dump_json())
    assert meta["step"] == "7" and meta["tokenizer"] == "byte"

    loaded = ck.load_checkpoint(tmp_path)  # a run folder resolves to its newest checkpoint
    assert loaded.step == 7 and loaded.path == path and loaded.tokenizer == "byte"
    assert loaded.recipe["model"] == recipe.model.model_dump(mode="json")
    other = Tiny()
    loaded.load_model(other)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    assert other.head.weight is other.embed.weight
    assert loaded.trainer_state()["data"] == {"samples_seen": 7}
    assert mmrec.recipes.load(loaded.recipe).model == recipe.model


def test_a_failed_save_leaves_nothing_behind(tmp_path, recipe, monkeypatch):
    """Writing the weights fails (as it did where numpy was missing): no half-written folder stays."""
    import safetensors.torch

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'numpy'")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(ModuleNotFoundError):
        _save(tmp_path, 5, Tiny(), recipe)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_never_saved(tmp_path, recipe):
    model = Tiny()
    with torch.no_grad():
        model.lin.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save step 3 under .*: the weights lin\.weight are not finite"):
        _save(tmp_path, 3, model, recipe)
    assert list(tmp_path.iterdir()) == []


def test_keep_last_and_newest(tmp_path, recipe):
    model = Tiny()
    for step in (1, 2, 3, 10):
        _save(tmp_path, step, model, recipe, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 10]
    assert ck.resolve_checkpoint(tmp_path).name == "step_000010"
    leftovers = [tmp_path / "step_000011.tmp", tmp_path / ".step_000010.0af3.old",  # a save, a replacement
                 tmp_path / "best" / "step_000009.tmp"]  # a save of the best
    for p in leftovers:
        p.mkdir(parents=True)
    assert ck.resolve_checkpoint(tmp_path).name == "step_000010"
    ck.remove_stale_tmp(tmp_path)
    assert not any(p.exists() for p in leftovers) and (tmp_path / "best").is_dir()
    _save(tmp_path, 10, model, recipe)  # the same step again replaces it
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 10]


def test_missing_run_or_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ck.load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("flip_model", r"model\.safetensors is corrupted"),
    ("truncate_trainer", r"trainer\.pt is truncated"),
    ("delete_model", r"model\.safetensors is missing"),
    ("delete_manifest", r"manifest\.json is missing"),
    ("garbage_manifest", r"manifest\.json is unreadable"),
    ("bad_safetensors", r"model\.safetensors is not a readable safetensors file"),
    ("bad_trainer", r"cannot load the trainer state in .*trainer\.pt"),
])
def test_damage_is_reported_by_file(tmp_path, recipe, damage, message):
    model = Tiny()
    _save(tmp_path, 1, model, recipe)
    path = _save(tmp_path, 2, model, recipe)
    manifest = json.loads((path / "manifest.json").read_text())

    def rewrite(name, data):  # damage that the manifest does not notice
        (path / name).write_bytes(data)
        manifest["files"][name]["bytes"] = len(data)
        manifest["files"][name]["sha256"] = ck._sha256(path / name)
        (path / "manifest.json").write_text(json.dumps(manifest))

    if damage == "flip_model":
        data = bytearray((path / "model.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (path / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate_trainer":
        data = (path / "trainer.pt").read_bytes()
        (path / "trainer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "delete_model":
        (path / "model.safetensors").unlink()
    elif damage == "delete_manifest":
        (path / "manifest.json").unlink()
    elif damage == "garbage_manifest":
        (path / "manifest.json").write_text("{")
    elif damage == "bad_safetensors":
        rewrite("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    elif damage == "bad_trainer":
        rewrite("trainer.pt", b"PK\x03\x04 not a zip")

    with pytest.raises(CheckpointError, match=message) as info:
        ck.load_checkpoint(tmp_path).trainer_state()
    text = str(info.value)
    assert "\n" not in text
    if damage != "bad_trainer":
        assert "the previous checkpoint is" in text and "step_000001" in text


def test_weights_of_another_shape(tmp_path, recipe):
    _save(tmp_path, 1, Tiny(), recipe)
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="do not fit the model"):
        ck.load_checkpoint(tmp_path).load_model(other)


def test_model_differences():
    a = {"n_layers": 2, "memory": {"kind": "hds", "levels": [0, 1]}, "d_model": 64}
    b = {"n_layers": 3, "memory": {"kind": "hds", "levels": [0, 1, 2]}, "d_model": 64}
    assert ck.model_differences(a, a) == []
    assert ck.model_differences(a, b) == [
        "model.memory.levels[2]: <absent> in the checkpoint, 2 now",
        "model.n_layers: 2 in the checkpoint, 3 now",
    ]


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    state = ck.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), torch.rand(3))
    random.seed(2)
    torch.manual_seed(2)
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_training_state_round_trip_through_the_one_load_path(tmp_path, recipe):
    """``save_training_checkpoint`` of a plain model writes the single-file layout; loading
    it back (through ``torch.distributed.checkpoint.state_dict``'s setters) restores the
    weights and every optimizer state tensor exactly, and gives a parameter that had no
    state (no gradient) none."""
    torch.manual_seed(0)

    def build():
        model = Tiny()
        model.unused = torch.nn.Parameter(torch.zeros(2))  # never gets a gradient
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, optimizer = build()
    for _ in range(2):
        model.head(model.lin(model.embed(torch.tensor([1, 2, 3])))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {"step": 2, "rng": ck.rng_state(), "data": {}}
    path = ck.save_training_checkpoint(tmp_path, 2, model, optimizer, recipe, state, ByteTokenizer())
    loaded = ck.load_checkpoint(path)
    assert loaded.layout == "single" and "optimizer" in loaded.trainer_state()

    other, other_optimizer = build()
    loaded.load_training_state(other, other_optimizer, loaded.trainer_state())
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
    assert other.head.weight is other.embed.weight
    expected, got = optimizer.state_dict(), other_optimizer.state_dict()
    assert got["state"].keys() == expected["state"].keys() and len(got["state"]) == 3  # not `unused`
    for i, s in expected["state"].items():
        assert s.keys() == got["state"][i].keys() and all(torch.equal(s[k], got["state"][i][k]) for k in s)
    # the setter hands betas over as a list, which AdamW unpacks alike
    assert [{**g, "betas": tuple(g["betas"])} for g in got["param_groups"]] == expected["param_groups"]


def test_a_training_state_of_another_model_is_refused(tmp_path, recipe):
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    model.lin(torch.ones(4)).sum().backward()
    optimizer.step()
    path = ck.save_training_checkpoint(tmp_path, 1, model, optimizer, recipe, {"step": 1}, ByteTokenizer())
    other = Tiny()
    other.extra = torch.nn.Linear(4, 4)
    loaded = ck.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="do not fit the model: missing extra.bias, extra.weight$"):
        loaded.load_training_state(other, torch.optim.AdamW(other.parameters()), loaded.trainer_state())
    other = Tiny()
    other.lin = torch.nn.Linear(4, 5)
    with pytest.raises(CheckpointError, match="do not fit the model: size mismatch for lin.weight"):
        loaded.load_model(other)

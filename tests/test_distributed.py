"""``mmrec.distributed.World`` in one process: the trivial world the trainer runs the same
code path on as on several processes (those are in ``tests/recipes/test_distributed.py``)."""

import pytest
import torch

from mmrec import distributed
from mmrec.distributed import World

CPU = torch.device("cpu")


def test_join_without_torchrun_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = distributed.join("cpu")
    assert world == World(CPU) and world.rank == 0 and world.size == 1
    assert world.is_main and not world.sharded and world.describe() == "cpu"
    with pytest.raises(RuntimeError, match="--device nonsense"):
        distributed.join("nonsense")
    world.leave()  # nothing to leave
    assert not distributed.is_distributed()


def test_collectives_of_a_world_of_one_return_their_input():
    world = World(CPU)
    values = torch.tensor([1.5, float("nan"), 3.0], dtype=torch.float32)
    mean = world.mean(values)
    assert mean.dtype == torch.float64 and torch.allclose(mean, values.double(), equal_nan=True, rtol=0, atol=0)
    assert world.mean_floats([0.25, 2.0]) == [0.25, 2.0]
    assert world.max(15) == 15 and world.max(0) == 0
    assert world.gather(("a", 1)) == [("a", 1)]
    assert world.gather_floats([1.5, 2.0]) == [[1.5, 2.0]]
    world.barrier()


def test_each_process_takes_a_contiguous_share_of_the_batch():
    assert World(CPU).share(16) == slice(0, 16)
    shares = [World(CPU, rank, 4).share(16) for rank in range(4)]
    assert shares == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    batch = torch.arange(16)
    assert torch.equal(torch.cat([batch[s] for s in shares]), batch)
    assert World(CPU, 3, 4).describe() == "4 processes on cpu (FSDP)" and not World(CPU, 3, 4).is_main


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3)])
        self.checkpointing = None

    def set_activation_checkpointing(self, on: bool) -> None:
        self.checkpointing = on

    def forward(self, x):
        return self.blocks[0](self.lin(x))


def test_a_world_of_one_leaves_the_model_whole():
    model = Blocks()
    assert World(CPU).parallelize(model, param_dtype=None, compile=False, activation_checkpointing=True) is model
    assert model.checkpointing is True
    compiled = World(CPU).parallelize(model, param_dtype=None, compile=True, activation_checkpointing=False)
    # each block compiled in place, as under FSDP: the same module, the same state-dict keys
    assert compiled is model and model.checkpointing is False
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert list(model.state_dict()) == list(Blocks().state_dict())


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 100.0])
def test_clip_grad_norm_is_torchs_on_plain_gradients(max_norm):
    torch.manual_seed(0)
    a, b = Blocks(), Blocks()
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3)
    for m in (a, b):
        m(x).square().sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm or float("inf"))
    got = distributed.clip_grad_norm(b.parameters(), max_norm)
    assert isinstance(got, torch.Tensor) and got.ndim == 0 and torch.equal(got, expected)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)
    if max_norm == 0.5:
        assert expected > 0.5  # the case clips

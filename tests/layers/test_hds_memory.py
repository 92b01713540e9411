import math

import pytest
import torch

from mmrec.layers.hds_memory import HDSMemory
from tests.helpers import rel_err


def reference(memory_module, q, k, v, chunk_size, memory):
    """The memory as a plain loop over chunks: read the memory as it is, then write the chunk."""
    m = memory_module
    batch, length, _ = q.shape
    contexts = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        levels = [memory]
        if 1 in m.levels:
            levels.append(memory.reshape(batch, m.banks, m.slots // 4, 4, m.dim).mean(3))
        if 2 in m.levels:
            levels.append(memory.reshape(batch, m.banks, m.slots // 16, 16, m.dim).mean(3))
        contexts.append(m.read(q[:, start:stop], torch.cat(levels, dim=2)))
        keys = k[:, start:stop].reshape(batch, stop - start, m.banks, m.dim).transpose(1, 2)
        values = v[:, start:stop].reshape(batch, stop - start, m.banks, m.dim).transpose(1, 2)
        weights = (m.slot_queries @ keys.transpose(-1, -2) / math.sqrt(m.dim)).softmax(-1)  # [B, banks, M, c]
        pooled = weights @ values
        beta = torch.sigmoid((pooled * m.write_gate[:, None, :]).sum(-1) + m.write_gate_bias)[..., None]
        memory = (1 - beta) * memory + beta * pooled
    return torch.cat(contexts, dim=1), memory


@pytest.mark.parametrize("length,levels", [(23, [0, 1, 2]), (24, [0, 2]), (5, [0])])
def test_matches_chunk_loop_float64_with_gradients(length, levels):
    config = HDSMemory.Config(slots=16, banks=2, dim=5, levels=levels)
    memory = HDSMemory(config, d_model=12, n_heads=4).double()
    for p in memory.parameters():
        torch.nn.init.normal_(p)
    q = torch.randn(2, length, 12, dtype=torch.float64)
    k, v = torch.randn(2, length, 10, dtype=torch.float64), torch.randn(2, length, 10, dtype=torch.float64)
    start = torch.randn(2, 2, 16, 5, dtype=torch.float64)
    context, last = memory(q, k, v, chunk_size=6, memory=start)
    ref_context, ref_last = reference(memory, q, k, v, 6, start)
    assert rel_err(context, ref_context) < 1e-10
    assert rel_err(last, ref_last) < 1e-10
    probe = torch.randn_like(context)
    params = [p for name, p in memory.named_parameters() if name != "initial"]  # a start was given
    got = torch.autograd.grad((context * probe).sum(), params, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad((ref_context * probe).sum(), params, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want):
        if w.abs().max() == 0:  # one chunk: what it writes is read by no token
            assert g.abs().max() == 0
        else:
            assert rel_err(g, w) < 1e-9


def test_default_start_is_the_learned_initial_memory():
    memory = HDSMemory(HDSMemory.Config(slots=16, banks=1, dim=4), d_model=8, n_heads=2).double()
    q, k, v = (torch.randn(1, 10, w, dtype=torch.float64) for w in (8, 4, 4))
    a, _ = memory(q, k, v, chunk_size=4)
    b, _ = memory(q, k, v, chunk_size=4, memory=memory.initial[None])
    torch.testing.assert_close(a, b)


def test_config_rejects_slots_that_do_not_pool():
    with pytest.raises(ValueError, match="divisible by 16"):
        HDSMemory.Config(slots=24, levels=[0, 1, 2])
    HDSMemory.Config(slots=24, levels=[0, 1])

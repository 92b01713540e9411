import math

import pytest
import torch

from mmrec.layers.hds_memory import HDSMemory, _SlotPooling
from tests.helpers import rel_err


def reference(memory_module, q, k, v, chunk_size, memory, resets=None):
    """The memory as a plain loop over chunks: read the memory as it is, then write the chunk.
    With ``resets``, per sequence: a token at or after a document start in its chunk reads
    the initial memory, and a chunk holding a start is written, from its last start on,
    onto the initial memory."""
    m = memory_module
    batch, length, _ = q.shape
    contexts = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        context = read(m, q[:, start:stop], memory)
        if resets is not None:
            initial = read(m, q[:, start:stop], m.initial.expand(batch, -1, -1, -1))
            after_start = resets[:, start:stop].cumsum(1)[..., None] > 0
            context = torch.where(after_start, initial, context)
        contexts.append(context + m.own_value * own_values(m, v[:, start:stop]))
        keys = k[:, start:stop].reshape(batch, stop - start, m.banks, m.dim).transpose(1, 2)
        values = v[:, start:stop].reshape(batch, stop - start, m.banks, m.dim).transpose(1, 2)
        scores = m.slot_queries @ keys.transpose(-1, -2) / math.sqrt(m.dim)  # [B, banks, M, c]
        restart = torch.zeros(batch, dtype=torch.bool)
        if resets is not None:  # pool from the chunk's last start on, onto the initial memory
            chunk = resets[:, start:stop]
            restart = chunk.any(1)
            later = chunk.flip(1).cumsum(1).flip(1) - chunk.long()  # starts after each place
            scores = scores.masked_fill((later > 0)[:, None, None, :], float("-inf"))
        pooled = scores.softmax(-1) @ values
        beta = torch.sigmoid((pooled * m.write_gate[:, None, :]).sum(-1) + m.write_gate_bias)[..., None]
        before = torch.where(restart[:, None, None, None], m.initial, memory)
        memory = (1 - beta) * before + beta * pooled
    return torch.cat(contexts, dim=1), memory


def read(m, q, memory):
    """Queries ``[B, L, d]`` over ``memory`` ``[B, banks, M, dim]`` and its HDS levels."""
    batch = memory.shape[0]
    levels = [memory] if 0 in m.levels else []
    for level, pool in ((1, 4), (2, 16), (3, 64)):
        if level in m.levels:
            levels.append(memory.reshape(batch, m.banks, m.slots // pool, pool, m.dim).mean(3))
    return m.read(q, torch.cat(levels, dim=2))


def own_values(m, v):
    """Each query head's projection of its bank's slice of ``v`` ``[B, L, banks*dim]``, head by head."""
    heads, group = m.read.n_heads, m.read.n_heads // m.banks
    slices = v.unflatten(-1, (m.banks, m.dim))
    return torch.cat([slices[:, :, h // group] @ m.read.value[h // group] for h in range(heads)], dim=-1)


@pytest.mark.parametrize(
    "length,levels,slots,own_value",
    [(23, [0, 1, 2], 16, 0.0), (24, [0, 2], 16, 0.0), (5, [0], 16, 0.0), (23, [0, 1, 2, 3], 64, 0.0), (23, [1, 3], 64, 0.0),
     (23, [0, 1], 16, 0.1), (17, [0, 3], 64, -0.7)],
)
def test_matches_chunk_loop_float64_with_gradients(length, levels, slots, own_value):
    config = HDSMemory.Config(slots=slots, banks=2, dim=5, levels=levels, own_value=own_value)
    memory = HDSMemory(config, d_model=12, n_heads=4).double()
    for p in memory.parameters():
        torch.nn.init.normal_(p)
    q = torch.randn(2, length, 12, dtype=torch.float64)
    k, v = torch.randn(2, length, 10, dtype=torch.float64), torch.randn(2, length, 10, dtype=torch.float64)
    start = torch.randn(2, 2, slots, 5, dtype=torch.float64)
    state = {"memory": start, "pending_k": k[:, :0], "pending_v": v[:, :0]}
    context, next_state = memory(q, k, v, chunk_size=6, state=state)
    ref_context, _ = reference(memory, q, k, v, 6, start)
    assert rel_err(context, ref_context) < 1e-10
    # the state holds the memory after the last complete chunk and the rest as pending
    full = length // 6 * 6
    _, ref_last = reference(memory, q[:, :full], k[:, :full], v[:, :full], 6, start) if full else (None, start)
    assert rel_err(next_state["memory"], ref_last) < 1e-10
    torch.testing.assert_close(next_state["pending_k"], k[:, full:])
    probe = torch.randn_like(context)
    params = [p for name, p in memory.named_parameters() if name != "initial"]  # a start was given
    inputs = [q, k, v]
    for x in inputs:
        x.requires_grad_()
    context, _ = memory(q, k, v, chunk_size=6, state=state)
    ref_context, _ = reference(memory, q, k, v, 6, start)
    got = torch.autograd.grad((context * probe).sum(), params + inputs, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad((ref_context * probe).sum(), params + inputs, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want):
        if w.abs().max() == 0:  # one chunk: what it writes is read by no token
            assert g.abs().max() == 0
        else:
            assert rel_err(g, w) < 1e-9


def test_default_start_is_the_learned_initial_memory():
    memory = HDSMemory(HDSMemory.Config(slots=16, banks=1, dim=4), d_model=8, n_heads=2).double()
    q, k, v = (torch.randn(1, 10, w, dtype=torch.float64) for w in (8, 4, 4))
    a, _ = memory(q, k, v, chunk_size=4)
    b, _ = memory(q, k, v, chunk_size=4, state=memory.initial_state(1, torch.float64))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("own_value", [0.0, 0.3])
@pytest.mark.parametrize("split", [[1] * 13, [5, 8], [4, 4, 5], [3, 1, 9], [13]])
def test_pieces_with_carried_state_equal_one_pass(split, own_value):
    memory = HDSMemory(HDSMemory.Config(slots=16, banks=2, dim=3, own_value=own_value), d_model=8, n_heads=2).double()
    q, k, v = (torch.randn(2, 13, w, dtype=torch.float64) for w in (8, 6, 6))
    whole, whole_state = memory(q, k, v, chunk_size=4)
    pieces, state, start = [], None, 0
    for size in split:
        context, state = memory(q[:, start:start + size], k[:, start:start + size], v[:, start:start + size], 4, state)
        pieces.append(context)
        start += size
    torch.testing.assert_close(torch.cat(pieces, 1), whole)
    for key in whole_state:
        torch.testing.assert_close(state[key], whole_state[key])


def test_config_rejects_slots_that_do_not_pool():
    with pytest.raises(ValueError, match="divisible by 16"):
        HDSMemory.Config(slots=24, levels=[0, 1, 2])
    HDSMemory.Config(slots=24, levels=[0, 1])
    with pytest.raises(ValueError, match="divisible by 64"):
        HDSMemory.Config(slots=32, levels=[0, 3])
    with pytest.raises(ValueError):
        HDSMemory.Config(levels=[0, 4])
    with pytest.raises(ValueError, match="finite"):
        HDSMemory.Config(own_value=float("nan"))


def test_options_are_off_by_default_and_change_nothing_then():
    config = HDSMemory.Config()
    assert config.levels == [0, 1, 2] and config.own_value == 0.0
    plain = HDSMemory(HDSMemory.Config(slots=16, banks=2, dim=3), d_model=8, n_heads=2).double()
    explicit = HDSMemory(HDSMemory.Config(slots=16, banks=2, dim=3, own_value=0.0), d_model=8, n_heads=2).double()
    explicit.load_state_dict(plain.state_dict())
    q, k, v = (torch.randn(2, 9, w, dtype=torch.float64) for w in (8, 6, 6))
    assert torch.equal(plain(q, k, v, 4)[0], explicit(q, k, v, 4)[0])


def test_flops_count_the_fourth_level_and_the_own_value():
    def flops(**fields):
        return HDSMemory(HDSMemory.Config(slots=64, banks=2, dim=5, **fields), d_model=12, n_heads=4).flops_per_token(99, 7)

    write = 12 * 64 * 10
    assert flops(levels=[0, 1, 2]) == 12 * (64 + 16 + 4) * 12 + write
    assert flops(levels=[0, 1, 2, 3]) == 12 * (64 + 16 + 4 + 1) * 12 + write
    assert flops(levels=[0], own_value=0.1) == 12 * 64 * 12 + write + 6 * 10 * 3  # key_dim x head_dim per token


def test_bfloat16_memories_are_read_narrow_but_carried_in_float32():
    torch.manual_seed(0)
    memory64 = HDSMemory(HDSMemory.Config(slots=16, banks=2, dim=5), d_model=12, n_heads=4).double()
    memory = HDSMemory(HDSMemory.Config(slots=16, banks=2, dim=5), d_model=12, n_heads=4).bfloat16()
    memory.load_state_dict(memory64.state_dict())
    q, k, v = (torch.randn(2, 27, w).bfloat16() for w in (12, 10, 10))
    context, state = memory(q, k, v, chunk_size=6)
    ref_context, ref_state = memory64(q.double(), k.double(), v.double(), chunk_size=6)
    assert context.dtype == torch.bfloat16 and state["memory"].dtype == torch.float32
    assert rel_err(context, ref_context) < 2e-2
    assert rel_err(state["memory"], ref_state["memory"]) < 2e-2
    # the carried memory is the float32 state, not the bf16 memories read: pieces give one pass
    first, mid = memory(q[:, :13], k[:, :13], v[:, :13], 6)
    second, last = memory(q[:, 13:], k[:, 13:], v[:, 13:], 6, mid)
    torch.testing.assert_close(torch.cat([first, second], 1), context)
    assert rel_err(last["memory"], state["memory"]) < 1e-6


def test_slot_pooling_is_softmax_attention_float64_with_gradients():
    """The write's pooling (its own backward, which recomputes the weights) against
    softmax(Q Kᵀ) V in float64, with keys and values as strided views of one projection,
    as the write passes them; odd sizes."""
    banks, slots, dim, chunks, length = 3, 5, 7, 4, 9
    queries = torch.randn(banks, slots, dim, dtype=torch.float64, requires_grad=True)
    projection = torch.randn(chunks, length, 2 * banks * dim + 3, dtype=torch.float64, requires_grad=True)

    def views(x):
        kv = x[..., : 2 * banks * dim].unflatten(-1, (2, banks, dim))
        return kv[..., 0, :, :].transpose(1, 2), kv[..., 1, :, :].transpose(1, 2)  # [N, banks, C, dim]

    def reference(q, x):
        keys, values = views(x)
        return torch.einsum("msd,nmcd->nmsc", q, keys).softmax(-1) @ values

    grad = torch.randn(chunks, banks, slots, dim, dtype=torch.float64)
    got = _SlotPooling.apply(queries, *views(projection))
    want = reference(queries, projection)
    torch.testing.assert_close(got, want)
    grads_got = torch.autograd.grad(got, (queries, projection), grad)
    grads_want = torch.autograd.grad(want, (queries, projection), grad)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(lambda q, x: _SlotPooling.apply(q, *views(x)), (queries, projection))


def test_slot_pooling_in_bfloat16_is_near_the_float64_result():
    queries, keys, values = (torch.randn(shape, dtype=torch.float64) for shape in ((2, 16, 32), (3, 2, 24, 32), (3, 2, 24, 32)))
    queries = queries * 32**-0.5
    want = _SlotPooling.apply(queries, keys, values)
    got = _SlotPooling.apply(*(x.to(torch.bfloat16) for x in (queries, keys, values)))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)


# --- document resets: the memory forgets at a document start ---------------------------------

CHUNK = 4


def small_memory(own_value=0.0, levels=(0, 1)):
    """Odd sizes: 4 slots, 2 banks of width 3, 2 query heads; every parameter random."""
    config = HDSMemory.Config(slots=4, banks=2, dim=3, levels=list(levels), own_value=own_value)
    memory = HDSMemory(config, d_model=8, n_heads=2).double()
    for p in memory.parameters():
        torch.nn.init.normal_(p)
    return memory


def inputs(length, starts=(6, 13)):
    """q, k, v ``[2, length, .]`` and resets: ``starts`` in the first sequence, none in the second."""
    q, k, v = (torch.randn(2, length, w, dtype=torch.float64) for w in (8, 6, 6))
    resets = torch.zeros(2, length, dtype=torch.bool)
    resets[0, list(starts)] = True
    return q, k, v, resets


@pytest.mark.parametrize("own_value", [0.0, 0.4])
@pytest.mark.parametrize("starts", [(6, 13), (8, 13), (0, 5, 7)])  # inside chunks; on a chunk border; the first token
def test_resets_match_chunk_loop_float64_with_gradients(starts, own_value):
    memory = small_memory(own_value)
    q, k, v, resets = inputs(19, starts)
    for x in (q, k, v):
        x.requires_grad_()
    context, state = memory(q, k, v, CHUNK, resets=resets)
    start = memory.initial.expand(2, -1, -1, -1)
    ref_context, _ = reference(memory, q, k, v, CHUNK, start, resets)
    _, ref_memory = reference(memory, q[:, :16], k[:, :16], v[:, :16], CHUNK, start, resets[:, :16])
    assert rel_err(context, ref_context) < 1e-10
    assert rel_err(state["memory"], ref_memory) < 1e-10
    assert torch.equal(state["pending_resets"], resets[:, 16:])
    probe = torch.randn_like(context)
    wrt = [q, k, v, *memory.parameters()]
    got = torch.autograd.grad((context * probe).sum(), wrt, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad((ref_context * probe).sum(), wrt, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-9


@pytest.mark.parametrize("starts", [(6, 13), (8, 13), (12,)])  # inside chunks; on a chunk border
def test_a_document_reads_nothing_of_earlier_ones(starts):
    memory = small_memory(own_value=0.3)
    length = 21  # the chunk after the last start is complete: the memory carried on is written
    q, k, v, resets = inputs(length, starts)
    context, state = memory(q, k, v, CHUNK, resets=resets)
    for start in starts:
        other = [x.clone() for x in (q, k, v)]
        for x in other:
            x[0, :start] = torch.randn_like(x[0, :start])
        changed, changed_state = memory(*other, CHUNK, resets=resets)
        torch.testing.assert_close(changed[0, start:], context[0, start:], rtol=0, atol=1e-12)
        assert (changed[0, :start] - context[0, :start]).abs().max() > 1e-6  # what was changed is read
        torch.testing.assert_close(changed[1], context[1], rtol=0, atol=0)  # the other sequence
        if start == starts[-1]:  # the state carried on holds the last document only
            for name in state:
                torch.testing.assert_close(changed_state[name][0], state[name][0], rtol=0, atol=1e-12)
    # gradients: exactly zero from the later document's context to the earlier tokens
    last = starts[-1]
    probe = torch.randn(length - last, 8, dtype=torch.float64)
    for given in (resets, None):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        later, _ = memory(*xs, CHUNK, resets=given)
        grads = torch.autograd.grad((later[0, last:] * probe).sum(), xs)
        if given is None:  # without resets the earlier tokens do reach it: the check below could fail
            assert all(g[0, :last].abs().max() > 0 for g in grads[1:])
        else:
            assert all(torch.equal(g[0, :last], torch.zeros_like(g[0, :last])) for g in grads)
            assert grads[0][0, last:].abs().max() > 0 and grads[2][0, last:].abs().max() > 0


@pytest.mark.parametrize(
    "split",
    [[6, 13], [5, 14], [7, 12], [13, 6], [14, 5], [2, 3, 3, 11], [10, 1, 1, 1, 6], [1] * 19, [19]],
    ids=lambda split: "-".join(map(str, split)),
)
def test_pieces_with_resets_equal_one_pass(split):
    """Splits before, on and after a start, and inside a chunk whose start was in an
    earlier piece (the chunk in progress carries its starts until it completes)."""
    memory = small_memory(own_value=0.2)
    q, k, v, resets = inputs(19)
    whole, whole_state = memory(q, k, v, CHUNK, resets=resets)
    pieces, state, start = [], None, 0
    for size in split:
        piece = slice(start, start + size)
        context, state = memory(q[:, piece], k[:, piece], v[:, piece], CHUNK, state, resets=resets[:, piece])
        assert state["pending_resets"].shape == state["pending_k"].shape[:2]
        pieces.append(context)
        start += size
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-12, atol=1e-12)
    assert state.keys() == whole_state.keys()
    for name in whole_state:
        torch.testing.assert_close(state[name], whole_state[name], rtol=1e-12, atol=1e-12)


def test_pieces_with_and_without_resets_continue_each_other():
    """A state from a call without resets has no starts in its chunk in progress; a call
    without resets after one with them keeps the carried starts."""
    memory = small_memory()
    q, k, v, resets = inputs(19, starts=(6,))
    whole, whole_state = memory(q, k, v, CHUNK, resets=resets)
    first, state = memory(q[:, :5], k[:, :5], v[:, :5], CHUNK)  # no starts among these tokens
    assert "pending_resets" not in state
    second, state = memory(q[:, 5:7], k[:, 5:7], v[:, 5:7], CHUNK, state, resets=resets[:, 5:7])
    assert state["pending_resets"].any()  # the start at 6, in the chunk in progress
    third, state = memory(q[:, 7:], k[:, 7:], v[:, 7:], CHUNK, state)  # resets=None: no more starts
    torch.testing.assert_close(torch.cat([first, second, third], 1), whole, rtol=1e-12, atol=1e-12)
    for name in whole_state:
        torch.testing.assert_close(state[name], whole_state[name], rtol=1e-12, atol=1e-12)


def test_no_resets_is_the_plain_path_and_no_starts_change_nothing():
    memory = small_memory(own_value=0.3)
    q, k, v, _ = inputs(19)
    plain, plain_state = memory(q, k, v, CHUNK)
    given_none, none_state = memory(q, k, v, CHUNK, resets=None)
    assert torch.equal(plain, given_none) and none_state.keys() == {"memory", "pending_k", "pending_v"}
    for name in plain_state:
        assert torch.equal(none_state[name], plain_state[name])
    no_starts, state = memory(q, k, v, CHUNK, resets=torch.zeros(2, 19, dtype=torch.bool))
    torch.testing.assert_close(no_starts, plain, rtol=1e-12, atol=1e-12)
    for name in plain_state:
        torch.testing.assert_close(state[name], plain_state[name], rtol=1e-12, atol=1e-12)
    assert not state["pending_resets"].any()


@pytest.mark.parametrize("t", [3, 6, 8, 11, 13, 14, 18])
def test_resets_keep_causality(t):
    """Changing tokens (and document starts) from ``t`` on never changes an earlier context."""
    memory = small_memory(own_value=0.3)
    q, k, v, resets = inputs(19)
    context, _ = memory(q, k, v, CHUNK, resets=resets)
    future = [x.clone() for x in (q, k, v, resets)]
    for x in future[:3]:
        x[:, t:] = torch.randn_like(x[:, t:])
    future[3][:, t:] = torch.rand(2, 19 - t) < 0.3
    changed, _ = memory(*future[:3], CHUNK, resets=future[3])
    torch.testing.assert_close(changed[:, :t], context[:, :t], rtol=0, atol=0)
    assert (changed[:, t:] - context[:, t:]).abs().max() > 1e-6


def test_bad_resets_are_refused_and_static_decoding_refuses_a_pending_start():
    memory = small_memory()
    q, k, v, resets = inputs(7, starts=(6,))
    with pytest.raises(ValueError, match=r"resets must be a bool tensor \[B, T\]"):
        memory(q, k, v, CHUNK, resets=resets[:, 1:])
    with pytest.raises(ValueError, match="bool"):
        memory(q, k, v, CHUNK, resets=resets.long())
    _, state = memory(q, k, v, CHUNK, resets=resets)  # the start at 6 is in the chunk in progress
    with pytest.raises(ValueError, match="static decoding takes no document starts"):
        memory.static_state(state, 2, CHUNK)
    _, state = memory(q[:, :5], k[:, :5], v[:, :5], CHUNK, resets=resets[:, :5])  # none pending: fine
    assert memory.static_state(state, 2, CHUNK)["pending_k"].shape == (2, CHUNK, 6)


def test_a_document_starting_on_a_chunk_border_is_a_fresh_sequence():
    """Written onto the initial memory from the start on: a document whose first token is
    a chunk's first token gets the context and memory of the same tokens fed alone."""
    memory = small_memory(own_value=0.2)
    q, k, v, resets = inputs(19, starts=(2 * CHUNK,))
    context, state = memory(q, k, v, CHUNK, resets=resets)
    alone, alone_state = memory(q[:1, 2 * CHUNK :], k[:1, 2 * CHUNK :], v[:1, 2 * CHUNK :], CHUNK)
    torch.testing.assert_close(context[:1, 2 * CHUNK :], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(state["memory"][:1], alone_state["memory"], rtol=0, atol=1e-12)

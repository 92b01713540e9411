import math

import pytest
import torch
from einops import rearrange

from mmrec.documents import document_ids
from mmrec.layers.attention import CausalSelfAttention, rotary, static_cache
from mmrec.layers.memory_attention import MemoryAttention
from tests.helpers import rel_err


def naive_rotary(x, base):
    """RoPE written per position and channel pair."""
    out = x.clone()
    half = x.shape[-1] // 2
    for t in range(x.shape[-2]):
        for i in range(half):
            angle = t * base ** (-i / half)
            c, s = math.cos(angle), math.sin(angle)
            out[..., t, i] = x[..., t, i] * c - x[..., t, i + half] * s
            out[..., t, i + half] = x[..., t, i] * s + x[..., t, i + half] * c
    return out


def test_rotary_matches_naive():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    assert rel_err(rotary(x, 100.0), naive_rotary(x, 100.0)) < 1e-12  # float64 inputs rotate in float64
    assert rel_err(rotary(x.float(), 100.0), naive_rotary(x, 100.0)) < 1e-6  # others in float32


def test_causal_attention_matches_masked_softmax_float64():
    attn = CausalSelfAttention(12, 3, rope_base=50.0).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    q, k, v = (attn.qkv(x).view(2, 9, 3, 3, 4).permute(2, 0, 3, 1, 4))
    q, k = naive_rotary(q, 50.0), naive_rotary(k, 50.0)
    scores = q @ k.transpose(-1, -2) / 2.0
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 12))
    assert rel_err(attn(x)[0], ref) < 1e-6


def test_kv_cache_pieces_equal_one_pass():
    attn = CausalSelfAttention(12, 3).double()
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    whole, _ = attn(x)
    outputs, cache = [], None
    for start, stop in ((0, 4), (4, 5), (5, 6), (6, 11)):
        y, cache = attn(x[:, start:stop], cache, position=start)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), whole)
    assert cache["k"].shape[2] >= 11  # grown by doubling: 4 -> 8 -> 16


# documents in a packed sequence: row 0 holds three (starts at 5 and 9), row 1 one
T = 13


def packed_resets():
    resets = torch.zeros(2, T, dtype=torch.bool)
    resets[0, 5] = resets[0, 9] = True
    return resets


def test_document_mask_isolates_documents_float64():
    attn = CausalSelfAttention(12, 3, rope_base=50.0).double()
    x = torch.randn(2, T, 12, dtype=torch.float64, requires_grad=True)
    resets = packed_resets()
    y, cache = attn(x, resets=resets)
    assert torch.equal(cache["doc"], document_ids(resets))
    # each later document of row 0 is what it gives alone, from an empty cache
    for start, stop in ((5, 9), (9, T)):
        assert rel_err(y[:1, start:stop], attn(x[:1, start:stop].detach())[0]) < 1e-12
    # changing the first document changes nothing after it in row 0, everything in row 1
    changed = x.detach().clone()
    changed[:, :5] = torch.randn(2, 5, 12, dtype=torch.float64)
    y2 = attn(changed, resets=resets)[0]
    assert rel_err(y2[0, 5:], y[0, 5:]) < 1e-12
    assert rel_err(y2[1, 5:], y[1, 5:]) > 1e-3
    # no gradient crosses a document start
    probe = torch.randn(T, 12, dtype=torch.float64)
    grad_second = torch.autograd.grad((y[0, 5:9] * probe[5:9]).sum(), x, retain_graph=True)[0]
    grad_third = torch.autograd.grad((y[0, 9:] * probe[9:]).sum(), x, retain_graph=True)[0]
    grad_row1 = torch.autograd.grad((y[1, 5:] * probe[5:]).sum(), x)[0]
    assert torch.equal(grad_second[0, :5], torch.zeros(5, 12, dtype=torch.float64))
    assert torch.equal(grad_third[0, :9], torch.zeros(9, 12, dtype=torch.float64))
    assert grad_second[0, 5:9].abs().min() > 0 and grad_row1[1, :5].abs().min() > 0


def test_document_mask_is_causal():
    attn = CausalSelfAttention(12, 3).double()
    x = torch.randn(2, T, 12, dtype=torch.float64)
    resets = packed_resets()
    y = attn(x, resets=resets)[0]
    for t in range(T - 1):
        future = x.clone()
        future[:, t + 1 :] = torch.randn(2, T - t - 1, 12, dtype=torch.float64)
        assert torch.equal(attn(future, resets=resets)[0][:, : t + 1], y[:, : t + 1])


@pytest.mark.parametrize("cuts", [(4,), (5,), (6,), (3, 9), (5, 10), (9, 10), (1, 2, 8)])  # before, on, after a start
def test_document_mask_pieces_equal_one_pass(cuts):
    attn = CausalSelfAttention(12, 3).double()
    x = torch.randn(2, T, 12, dtype=torch.float64)
    resets = packed_resets()
    whole = attn(x, resets=resets)[0]
    outputs, cache = [], None
    for start, stop in zip((0, *cuts), (*cuts, T)):
        y, cache = attn(x[:, start:stop], cache, position=start, resets=resets[:, start:stop])
        outputs.append(y)
    assert rel_err(torch.cat(outputs, 1), whole) < 1e-12
    assert torch.equal(cache["doc"][:, :T], document_ids(resets))


def test_pieces_with_and_without_resets_continue_documents():
    """A cache made without resets holds one document; a call without resets continues the last."""
    attn = CausalSelfAttention(12, 3).double()
    x = torch.randn(2, T, 12, dtype=torch.float64)
    resets = packed_resets()
    whole = attn(x, resets=resets)[0]
    first, cache = attn(x[:, :4], None)  # no start among tokens 0-3
    assert "doc" not in cache
    middle, cache = attn(x[:, 4:10], cache, position=4, resets=resets[:, 4:10])
    last, cache = attn(x[:, 10:], cache, position=10)  # nor among 10-12: the document of token 9 goes on
    assert rel_err(torch.cat([first, middle, last], 1), whole) < 1e-12


def test_no_resets_is_the_plain_causal_path():
    attn = CausalSelfAttention(12, 3, rope_base=50.0).double()
    x = torch.randn(2, T, 12, dtype=torch.float64)
    y, cache = attn(x)
    assert set(cache) == {"k", "v"}
    q, k, v = rearrange(attn.qkv(x), "b t (three h e) -> three b h t e", three=3, h=3)
    q, k = rotary(q, 50.0), rotary(k, 50.0)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(y, attn.out(rearrange(plain, "b h t e -> b t (h e)")))
    # no document starts: the same as no resets, in one pass and in pieces
    none = torch.zeros(2, T, dtype=torch.bool)
    assert rel_err(attn(x, resets=none)[0], y) < 1e-12
    head, cache = attn(x[:, :6], resets=none[:, :6])
    tail, _ = attn(x[:, 6:], cache, position=6, resets=none[:, 6:])
    assert rel_err(torch.cat([head, tail], 1), y) < 1e-12


@pytest.mark.parametrize("splits", [0, 4])
def test_static_steps_continue_the_last_document(splits):
    attn = CausalSelfAttention(12, 3).double()
    x = torch.randn(2, T, 12, dtype=torch.float64)
    resets = packed_resets()
    whole = attn(x, resets=resets)[0]
    _, cache = attn(x[:, :10], resets=resets[:, :10])
    static = static_cache(cache, 10, capacity=16, splits=splits)
    steps = [attn(x[:, t : t + 1], static, torch.tensor(t))[0] for t in range(10, T)]
    assert rel_err(torch.cat(steps, 1), whole[:, 10:]) < 1e-12
    assert torch.equal(static["doc"][:, :T], document_ids(resets))
    with pytest.raises(ValueError, match="static decode step"):
        attn(x[:, :1], static, torch.tensor(T), resets=resets[:, :1])


def test_resets_of_the_wrong_shape_are_refused():
    attn = CausalSelfAttention(12, 3)
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        attn(torch.randn(2, 5, 12), resets=torch.zeros(2, 4, dtype=torch.bool))


def test_memory_attention_matches_explicit_softmax_float64():
    heads, head_dim, banks, slot_dim = 4, 3, 2, 5
    attn = MemoryAttention(heads, head_dim, banks, slot_dim).double()
    q = torch.randn(3, 7, heads * head_dim, dtype=torch.float64, requires_grad=True)
    slots = torch.randn(3, banks, 11, slot_dim, dtype=torch.float64, requires_grad=True)
    out = attn(q, slots)
    ref = torch.empty(3, 7, heads, head_dim, dtype=torch.float64)
    for h in range(heads):
        bank = h // (heads // banks)  # heads are grouped over banks in order
        keys, values = slots[:, bank] @ attn.key[bank], slots[:, bank] @ attn.value[bank]
        weights = (q[..., h * head_dim:(h + 1) * head_dim] @ keys.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
        ref[:, :, h] = weights @ values
    ref = ref.flatten(2)
    assert rel_err(out, ref) < 1e-12
    probe = torch.randn_like(ref)
    got = torch.autograd.grad((out * probe).sum(), (q, slots))
    want = torch.autograd.grad((ref * probe).sum(), (q, slots))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10

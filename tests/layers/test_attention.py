import math

import torch

from mmrec.layers.attention import CausalSelfAttention, rotary
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

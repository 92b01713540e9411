import pytest
import torch

from mmrec.layers.short_conv import ShortConv
from tests.helpers import rel_err


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ_j w[K-1-j] x_{t-j}`` as a loop over time, zeros before the start."""
    batch, length, dim = x.shape
    size = weight.shape[0]
    out = torch.zeros_like(x)
    for t in range(length):
        for j in range(size):
            if t - j >= 0:
                out[:, t] += weight[size - 1 - j] * x[:, t - j]
    return out


@pytest.mark.parametrize("size,length", [(2, 1), (4, 3), (4, 13), (3, 29)])
def test_matches_the_loop_with_gradients_float64(size, length):
    conv = ShortConv(11, size, init="random").double()
    x = torch.randn(3, length, 11, dtype=torch.float64, requires_grad=True)
    y, cache = conv(x)
    ref = reference(x, conv.weight)
    assert rel_err(y, ref) < 1e-12
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, conv.weight), grad)
    want = torch.autograd.grad(ref, (x, conv.weight), grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12
    # the cache holds the last K-1 inputs, zeros where the sequence is shorter
    expected = torch.cat([x.new_zeros(3, size - 1, 11), x], 1)[:, -(size - 1):]
    assert torch.equal(cache, expected)


def test_future_inputs_never_change_earlier_outputs():
    conv = ShortConv(7, 4, init="random").double()
    x = torch.randn(2, 20, 7, dtype=torch.float64)
    changed = x.clone()
    changed[:, 9:] = torch.randn_like(changed[:, 9:])
    before, after = conv(x)[0], conv(changed)[0]
    assert torch.equal(before[:, :9], after[:, :9])
    assert (before[:, 9:] - after[:, 9:]).abs().max() > 1e-6


def test_pieces_with_the_cache_equal_one_pass():
    conv = ShortConv(5, 4, init="random").double()
    x = torch.randn(2, 17, 5, dtype=torch.float64)
    whole, _ = conv(x)
    pieces, cache, start = [], None, 0
    for size in (1, 2, 5, 1, 8):  # pieces shorter than the kernel too
        y, cache = conv(x[:, start : start + size], cache)
        pieces.append(y)
        start += size
    assert rel_err(torch.cat(pieces, 1), whole) < 1e-14


def test_a_kernel_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        ShortConv(4, 1)


def test_identity_init_passes_the_input_through():
    conv = ShortConv(6, 3).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    assert torch.equal(conv(x)[0], x)
    with pytest.raises(ValueError, match="identity"):
        ShortConv(6, 3, init="zeros")


def test_equals_a_depthwise_conv1d():
    # the layer is nn.Conv1d(groups=D) without padding on the right, written as shifted sums
    conv = ShortConv(9, 4, init="random").double()
    x = torch.randn(2, 15, 9, dtype=torch.float64)
    padded = torch.nn.functional.pad(x.transpose(1, 2), (3, 0))
    want = torch.nn.functional.conv1d(padded, conv.weight.t().unsqueeze(1), groups=9).transpose(1, 2)
    assert rel_err(conv(x)[0], want) < 1e-14


def test_document_resets_start_the_convolution_again():
    """With resets, each document's output is the convolution of that document alone (fresh
    zeros before it), whether the sequence comes in one pass or in pieces."""
    torch.manual_seed(0)
    conv = ShortConv(5, 4, init="random").double()
    x = torch.randn(2, 13, 5, dtype=torch.float64)
    resets = torch.zeros(2, 13, dtype=torch.bool)
    resets[0, [4, 6]] = True  # a document of two tokens, shorter than the kernel
    resets[1, 12] = True  # the last token
    y, cache = conv(x, resets=resets)
    for row, bounds in ((0, (0, 4, 6, 13)), (1, (0, 12, 13))):
        for start, stop in zip(bounds, bounds[1:]):
            alone, _ = conv(x[row : row + 1, start:stop])
            torch.testing.assert_close(y[row : row + 1, start:stop], alone, rtol=0, atol=1e-14)
    # the cache holds the last document's inputs only: one token in row 1
    assert torch.equal(cache[1, :2], torch.zeros(2, 5, dtype=torch.float64)) and torch.equal(cache[1, 2], x[1, 12])
    for cut in (3, 5, 7, 12):
        first, carried = conv(x[:, :cut], resets=resets[:, :cut])
        second, last = conv(x[:, cut:], carried, resets=resets[:, cut:])
        torch.testing.assert_close(torch.cat([first, second], 1), y, rtol=0, atol=1e-14)
        torch.testing.assert_close(last, cache, rtol=0, atol=0)
    unreset, _ = conv(x)
    torch.testing.assert_close(conv(x, resets=torch.zeros_like(resets))[0], unreset, rtol=0, atol=1e-14)

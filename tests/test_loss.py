"""The chunked linear + cross-entropy against ``F.cross_entropy(head(x).float(), targets)``."""

import pytest
import torch
import torch.nn.functional as F

import mmrec
from mmrec.loss import chunk_tokens, linear_cross_entropy


def reference(x, weight, targets, reduction="mean"):
    logits = x @ weight.T
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(acc).flatten(0, -2), targets.flatten(), reduction=reduction)


def grads(loss_fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    loss = loss_fn(*inputs)
    loss.backward()
    return loss.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])  # one token, uneven chunks, one chunk
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_equal_the_reference_in_float64(chunk, reduction):
    B, T, d, V = 3, 37, 19, 263
    x = torch.randn(B, T, d, dtype=torch.float64)
    weight = torch.randn(V, d, dtype=torch.float64) / d**0.5
    targets = torch.randint(0, V, (B, T))
    targets[0, :5] = -100
    targets[2, -1] = -100
    want, (gx, gw) = grads(lambda a, b: reference(a, b, targets, reduction), x, weight)
    got, (hx, hw) = grads(lambda a, b: linear_cross_entropy(a, b, targets, reduction=reduction, chunk=chunk), x, weight)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hx, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hw, gw, rtol=1e-10, atol=1e-12)


def test_gradient_of_a_scaled_loss_and_only_the_inputs_asked_for():
    x = torch.randn(2, 11, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 5, dtype=torch.float64)
    targets = torch.randint(0, 17, (2, 11))
    (3.5 * linear_cross_entropy(x, weight, targets, chunk=4)).backward()
    want = torch.autograd.grad(3.5 * reference(x, weight, targets), x)[0]
    torch.testing.assert_close(x.grad, want)
    assert weight.grad is None


def test_gradcheck():
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (2, 5))
    targets[1, 2] = -100
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, targets, chunk=3), (x, weight))


def test_all_ignored_is_nan_like_the_reference():
    x, weight = torch.randn(4, 3), torch.randn(5, 3)
    targets = torch.full((4,), -100)
    assert linear_cross_entropy(x, weight, targets).isnan() and reference(x, weight, targets).isnan()
    assert linear_cross_entropy(x, weight, targets, reduction="sum") == 0


def test_bf16_autocast_on_cpu_matches_the_reference():
    B, T, d, V = 2, 45, 32, 301
    x = torch.randn(B, T, d)
    weight = torch.randn(V, d) * 0.2
    targets = torch.randint(0, V, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, (gx, gw) = grads(lambda a, b: reference(a, b, targets), x, weight)
        got, (hx, hw) = grads(lambda a, b: linear_cross_entropy(a, b, targets, chunk=8), x, weight)
    assert got.dtype == torch.float32 and hx.dtype == hw.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same bf16 logits, softmax in fp32
    torch.testing.assert_close(hx, gx, rtol=2e-2, atol=2e-4)  # bf16 matmuls of the gradient
    torch.testing.assert_close(hw, gw, rtol=2e-2, atol=2e-4)
    exact = reference(x.double(), weight.double(), targets)
    assert abs(got.item() - exact.item()) < 0.05  # bf16 logits: close to the exact loss, not equal


def test_chunk_size_keeps_the_logits_bounded():
    assert chunk_tokens(32000) == 524 and chunk_tokens(256) == 65536 and chunk_tokens(1 << 30) == 1
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="tokens"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("arch", ["mmrec", "transformer"])
def test_model_loss_equals_the_loss_of_its_logits_with_tied_embeddings(arch):
    model_cfg = {"arch": arch, "vocab_size": 53, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40,
                 "tie_embeddings": True}
    if arch == "mmrec":
        model_cfg.update(chunk_size=8, memory={"kind": "hds", "slots": 16, "banks": 2, "dim": 6})
    model = mmrec.LanguageModel(mmrec.recipes.parse({"name": "toy", "model": model_cfg}).model).double()
    assert model.head.weight is model.embed.weight
    ids = torch.randint(0, 53, (2, 21))
    targets = torch.randint(0, 53, (2, 21))
    targets[1, 3] = -100

    out = model(ids, targets=targets, return_state=False)
    assert out.logits is None
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids, return_state=False).logits
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")

    # without gradients long inputs run in pieces: the loss is the mean over all of them
    model.stream_piece = 8
    with torch.no_grad():
        streamed = model(ids, targets=targets).loss
    torch.testing.assert_close(streamed, want.detach(), rtol=1e-12, atol=1e-12)

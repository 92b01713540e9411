import json

import pytest
import torch

import mmrec
import mmrec.testing
from mmrec import registry
from mmrec_complex_scan import ComplexRecurrence


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def complex_loop(z, log_decay, gate, angle, h0):
    """The recurrence step by step in complex128."""
    h = torch.complex(h0[:, : z.shape[2]], h0[:, z.shape[2]:])
    rotation = torch.polar(torch.ones_like(angle), angle)
    out = []
    for t in range(z.shape[1]):
        h = log_decay[:, t].exp() * rotation * h + torch.sigmoid(gate[:, t]) * z[:, t]
        out.append(h.real)
    return torch.stack(out, 1), torch.cat([h.real, h.imag], -1)


@pytest.mark.parametrize("length", [1, 9, 300])
def test_matches_complex_loop_float64_with_gradients(length):
    recurrence = ComplexRecurrence(ComplexRecurrence.Config(max_period=50.0), d_model=7, n_heads=1).double()
    z, gate = torch.randn(2, length, 7, dtype=torch.float64), torch.randn(2, length, 7, dtype=torch.float64)
    log_decay = torch.empty(2, length, 7, dtype=torch.float64).uniform_(-0.5, -0.001)
    h0 = torch.randn(2, 14, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (z, log_decay, gate, h0)]
    h, h_last = recurrence(*inputs)
    ref, ref_last = complex_loop(z, log_decay, gate, recurrence.angle, h0)
    assert rel_err(h, ref) < 1e-9 and rel_err(h_last, ref_last) < 1e-9
    probe = torch.randn_like(h)
    wrt = [*inputs, recurrence.angle]
    for got, want in zip(torch.autograd.grad((h * probe).sum(), wrt), torch.autograd.grad((ref * probe).sum(), wrt)):
        assert rel_err(got, want) < 1e-8


def test_pieces_with_carried_state_equal_one_pass():
    recurrence = ComplexRecurrence(ComplexRecurrence.Config(), d_model=6, n_heads=2).double()
    z, gate = torch.randn(1, 20, 6, dtype=torch.float64), torch.randn(1, 20, 6, dtype=torch.float64)
    log_decay = torch.empty(1, 20, 6, dtype=torch.float64).uniform_(-0.3, -0.01)
    whole, _ = recurrence(z, log_decay, gate)
    first, state = recurrence(z[:, :7], log_decay[:, :7], gate[:, :7])
    second, _ = recurrence(z[:, 7:], log_decay[:, 7:], gate[:, 7:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)


def test_registered_and_selectable_from_a_recipe():
    assert registry.entries("recurrences")["complex"].package == "mmrec-complex-scan"
    model = mmrec.build("tiny", ["model.recurrence.kind=complex"])
    assert type(model.blocks[-1].recurrence).__name__ == "ComplexRecurrence"  # tiny's layer 0 keeps its delta rule
    assert '"complex"' in json.dumps(mmrec.recipes.schema())
    with pytest.raises(mmrec.recipes.RecipeError, match="max_period"):
        mmrec.recipes.load("tiny", ["model.recurrence={\"kind\": \"complex\", \"max_period\": 0.5}"])


@mmrec.testing.parametrize("recurrences", "complex", {"max_period": 20.0})
def test_conforms_to_the_variant_suite(check):
    # mmrec's conformance suite, one test per check, in a toy model with chunks of 6 tokens
    # (periods of 2 to 20 tokens: the rotations turn within the checks' sequences)
    check()

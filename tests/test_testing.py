"""mmrec.testing, the conformance suite of a variant: every built-in variant passes it, and
each check catches the broken variant it is there for."""

import re
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, create_model
from torch import nn

import mmrec
import mmrec.testing
from mmrec import registry
from mmrec.layers.hds_memory import HDSMemory
from mmrec.layers.parallel_recurrence import ParallelRecurrence
from mmrec.testing import (
    CHECKS,
    CheckFailed,
    VariantFailed,
    check_variant,
    variant_checks,
)

# (group, kind, the variant's config, model overrides): each recurrence with the hds memory,
# each memory with the parallel recurrence, and the delta recurrence with the window memory
BUILT_INS = [
    pytest.param("recurrences", "parallel", None, None, id="parallel"),
    pytest.param("recurrences", "exact", None, None, id="exact"),
    pytest.param("recurrences", "delta", {"chunk": 4}, None, id="delta"),  # its own chunks are crossed too
    pytest.param("memories", "hds", None, None, id="hds"),
    pytest.param("memories", "window", None, None, id="window"),
    pytest.param("memories", "delta", {"chunk": 4}, None, id="delta-memory"),
    pytest.param("recurrences", "delta", {"chunk": 4}, {"memory": {"kind": "window"}}, id="delta-window"),
    # the shipped hybrid's delta layer, with convolutions that mix from the start (so a
    # document reset that missed them would show)
    pytest.param("memories", "none", None, {"recurrence": {"kind": "delta", "chunk": 4}, "short_conv": 3,
                                            "short_conv_init": "random"}, id="delta-none-conv"),
]
WITHOUT_RESETS = {"exact", "window", "delta-memory", "delta-window"}  # refuse document resets, and say so


@pytest.mark.parametrize("group,kind,config,overrides", BUILT_INS)
def test_built_in_variants_pass(group, kind, config, overrides, request):
    report = check_variant(group, kind, config, model_overrides=overrides, slow=False)
    if request.node.callspec.id in WITHOUT_RESETS:
        assert report.pop("resets").startswith("takes no document resets, and says so: document resets are not supported by")
    assert report == {name: "ok" for name in CHECKS if name != "compile" and name in report}
    assert len(report) == len(CHECKS) - 1 - (request.node.callspec.id in WITHOUT_RESETS)


@pytest.mark.slow
@pytest.mark.parametrize("group,kind,config,overrides", BUILT_INS)
def test_built_in_variants_compile(group, kind, config, overrides):
    # aot_eager: Dynamo's fullgraph trace and AOTAutograd, seconds faster than inductor's
    # code generation (tests/test_model.py compiles the tiny recipe with inductor)
    assert check_variant(group, kind, config, model_overrides=overrides, checks=["compile"], compile_backend="aot_eager") == {"compile": "ok"}


# --- broken variants: each fails the check that is there for it -----------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _config(kind: str, base: type[BaseModel] = _Strict) -> type[BaseModel]:
    """A variant's ``Config`` whose ``kind`` is ``kind``."""
    return create_model(f"{kind.title()}Config", __base__=base, kind=(Literal[kind], kind))


class Forgetful(ParallelRecurrence):
    """Ignores the state it is handed: every call starts from zero."""

    Config = _config("forgetful")
    supports_resets = False

    def forward(self, z, log_decay, gate, h0=None):
        return super().forward(z, log_decay, gate, None)


class Peeking(HDSMemory):
    """Adds the mean query of the token's whole chunk to the context: tokens read the later
    tokens of their own chunk."""

    Config = _config("peeking", HDSMemory.Config)
    supports_resets = False

    def forward(self, q, k, v, chunk_size, state=None, dropout=0.0):
        context, next_state = super().forward(q, k, v, chunk_size, state, dropout)
        length = q.shape[1]
        padded = nn.functional.pad(q, (0, 0, 0, -length % chunk_size)).unflatten(1, (-1, chunk_size))
        peek = padded.mean(2, keepdim=True).expand_as(padded).flatten(1, 2)[:, :length]
        return context + peek, next_state


class Hoarding(nn.Module):
    """Exact causal attention over everything so far, its keys and values kept in the state."""

    Config = _config("hoarding")

    def __init__(self, config, *, d_model, n_heads, init_std=0.02):
        super().__init__()
        self.key_dim, self.n_heads = d_model, n_heads

    def forward(self, q, k, v, chunk_size, state=None, dropout=0.0):
        past_k, past_v = (state["k"], state["v"]) if state else (k[:, :0], v[:, :0])
        keys, values = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        heads = lambda x: x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
        mask = torch.ones(q.shape[1], keys.shape[1], dtype=torch.bool).tril(past_k.shape[1])
        out = nn.functional.scaled_dot_product_attention(heads(q), heads(keys), heads(values), attn_mask=mask)
        return out.transpose(1, 2).flatten(2), {"k": keys.clone(), "v": values.clone()}


class Stale(HDSMemory):
    """Its static decode step never writes a completed chunk to the memory."""

    Config = _config("stale", HDSMemory.Config)

    def complete_chunk(self, static):
        pass


class Breaking(ParallelRecurrence):
    """Breaks the compiled graph."""

    Config = _config("breaking")
    supports_resets = False

    def forward(self, z, log_decay, gate, h0=None):
        torch._dynamo.graph_break()
        return super().forward(z, log_decay, gate, h0)


class Leaky(ParallelRecurrence):
    """Says it takes document resets, and ignores them."""

    Config = _config("leaky")

    def forward(self, z, log_decay, gate, h0=None, resets=None):
        return super().forward(z, log_decay, gate, h0)


MEMORY = {"slots": 16, "banks": 2, "dim": 6}


@pytest.mark.parametrize("group,cls,config,failing,passing", [
    pytest.param("recurrences", Forgetful, None, {"pieces", "save_load"}, "causality", id="ignores-its-state"),
    pytest.param("memories", Peeking, MEMORY, {"causality", "pieces", "save_load", "static_decode"}, "gradients", id="reads-its-own-chunk"),
    pytest.param("memories", Hoarding, None, {"state_size"}, "pieces", id="state-grows"),
    pytest.param("memories", Stale, MEMORY, {"static_decode"}, "pieces", id="static-step-differs"),
    pytest.param("recurrences", Leaky, None, {"resets"}, "pieces", id="ignores-document-starts"),
])
def test_a_broken_variant_fails_the_right_checks(group, cls, config, failing, passing):
    with pytest.raises(VariantFailed) as caught:
        check_variant(group, cls, config, slow=False)
    assert set(caught.value.failed) == failing, str(caught.value)
    name = cls.Config.model_fields["kind"].default
    assert str(caught.value).startswith(f"{group} {name!r} fails {len(failing)} of 7 checks")
    check = {c.name: c for c in variant_checks(group, cls, config)}
    first = min(failing)
    with pytest.raises(CheckFailed, match=rf"^{group} '{name}' fails check '{first}': "):
        check[first]()
    check[passing]()
    assert name not in registry.names(group)  # registered for the checks only


def test_the_messages_say_what_is_wrong():
    def detail(cls, name, config=None, group="memories"):
        with pytest.raises(CheckFailed) as caught:
            next(c for c in variant_checks(group, cls, config) if c.name == name)()
        return caught.value.detail

    assert re.search(r"changing the tokens after position 2 changed the logits at position 0 <= 2", detail(Peeking, "causality", MEMORY))
    assert re.search(r"holds \d+ bytes after 22 tokens and \d+ after 46 .*'memory\.k' \[2, 22, 24\] -> \[2, 46, 24\]", detail(Hoarding, "state_size"))
    assert "StaticDecoder steps (cuda_graph=False), against eager steps" in detail(Stale, "static_decode", MEMORY)
    assert "fed in pieces [1, 1, 1" in detail(Forgetful, "pieces", group="recurrences")
    assert re.match(r"with a document starting at position 8, changing the tokens before it .* changed its logits",
                    detail(Leaky, "resets", group="recurrences"))


def test_a_graph_break_fails_the_compile_check():
    with pytest.raises(CheckFailed, match=r"fails check 'compile': torch.compile\(model, fullgraph=True, backend='aot_eager'\) failed"):
        variant_checks("recurrences", Breaking, checks=["compile"], compile_backend="aot_eager")[0]()


def test_a_model_without_a_static_step_reports_the_eager_fallback():
    note = check_variant("memories", Hoarding, checks=["static_decode"])["static_decode"]
    assert note.startswith("no static decode step") and "mmrec.generate decodes with eager steps" in note


# --- the docs' own example -------------------------------------------------------------------


@pytest.fixture
def retention(monkeypatch):
    """docs/plugins.md's `retention` recurrence, as the module its package would install."""
    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    source = re.search(r"^```python file=mmrec-retention/mmrec_retention/__init__.py\n(.*?)^```", doc, re.DOTALL | re.MULTILINE).group(1)
    module = types.ModuleType("mmrec_retention")
    monkeypatch.setitem(sys.modules, "mmrec_retention", module)  # where torch.compile looks for it
    exec(compile(source, "mmrec_retention/__init__.py", "exec"), module.__dict__)  # noqa: S102 (the doc's code)
    return module.Retention


def test_the_docs_retention_example_passes_every_check(retention):
    report = check_variant("recurrences", retention, slow=False)
    assert report.pop("resets").startswith("takes no document resets, and says so")  # the example leaves them out
    assert set(report.values()) == {"ok"}


def test_a_recurrence_that_ignores_log_decay_but_keeps_mdi_fails_the_gradient_check(retention):
    """What ``needs_decay = False`` prevents: MDI built, its output never read."""
    keeps_mdi = type("KeepsMDI", (retention,), {"needs_decay": True})
    with pytest.raises(CheckFailed) as failure:
        variant_checks("recurrences", keeps_mdi, checks=["gradients"])[0]()
    assert re.fullmatch(r"parameters with no gradient: (blocks\.\d\.mdi\.\S+(, )?){8} \(only MDI's parameters.*",
                        failure.value.detail)


# --- the API ---------------------------------------------------------------------------------


def test_checks_are_named_callables():
    checks = variant_checks("recurrences", "parallel")
    assert [c.name for c in checks] == list(CHECKS) and [str(c) for c in checks][:2] == ["parallel-causality", "parallel-pieces"]
    assert [c.name for c in checks if c.slow] == ["compile"]
    assert [c.name for c in variant_checks("recurrences", "parallel", slow=False)] == [n for n in CHECKS if n != "compile"]
    mark = mmrec.testing.parametrize("recurrences", "parallel")
    assert mark.args[0] == "check" and [p.id for p in mark.args[1]] == list(CHECKS)
    assert [m.name for p in mark.args[1] for m in p.marks] == ["slow"]


def test_bad_arguments_fail_at_once():
    with pytest.raises(ValueError, match="unknown checks \\['causalty'\\]"):
        variant_checks("recurrences", "parallel", checks=["causalty"])
    with pytest.raises(ValueError, match="group must be one of"):
        variant_checks("scan", "parallel")
    with pytest.raises(mmrec.recipes.RecipeError, match="unknown recurrence 'paralel'"):
        variant_checks("recurrences", "paralel")
    with pytest.raises(mmrec.recipes.RecipeError, match=r"model\.memory\.slotz: unknown field"):
        variant_checks("memories", "hds", {"slotz": 4})
    with pytest.raises(ValueError, match="already registered"), mmrec.testing.registered("recurrences", Forgetful, name="parallel"):
        pass

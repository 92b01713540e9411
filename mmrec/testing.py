"""The conformance suite of a variant: what every recurrence and memory must do in a model.

A registered variant (group ``"recurrences"``, a recurrence, or ``"memories"``, a memory) is put
in a tiny float64 MM-Rec model (``BASE_MODEL``: 2 layers, chunks of ``CHUNK`` = 6 tokens;
sequences of three chunks and a few tokens) and checked for what the rest of mmrec relies on:

=================  ==========================================================================
``causality``      changing tokens after position ``t`` never changes the logits at ``<= t``
                   (``t`` inside a chunk, a chunk's last token, the token after a border) and
                   does change later ones
``pieces``         the sequence fed in pieces (1-token steps, a half-finished chunk, random
                   splits) with the carried ``State`` gives the one-pass logits and final state
``save_load``      a ``State`` saved to safetensors and loaded back continues identically
``state_size``     the state's size does not depend on the length (same bytes after ``n`` and
                   after ``n + kC`` tokens), and its tensors pin no larger storage
``gradients``      every parameter (the block's, MDI's, the variant's) gets a finite,
                   nonzero gradient of the training loss
``resets``         with document starts (``resets``, inside a chunk and at a border), changing
                   the earlier documents' tokens never changes a later document's logits, and
                   pieces with the carried ``State`` give the one-pass logits; a model whose
                   variants do not take resets refuses them with a ``ValueError`` (noted)
``static_decode``  ``mmrec.decode.StaticDecoder`` steps (no CUDA graph) equal eager steps, or,
                   for a model without a static step, ``mmrec.generate`` decodes eagerly (the
                   documented fallback, reported as such)
``compile``        ``torch.compile(model, fullgraph=True)`` of the float32 forward runs and
                   matches eager, with document resets too for a model that takes them
                   (slow: seconds on a CPU)
=================  ==========================================================================

One call runs them all and raises an ``AssertionError`` naming the variant and every
check that failed::

    import mmrec.testing
    mmrec.testing.check_variant("memories", "fifo", {"slots": 4, "banks": 2, "dim": 6})

In a pytest suite, one test per check (the slow ones marked ``slow``)::

    @mmrec.testing.parametrize("memories", "fifo", {"slots": 4, "banks": 2, "dim": 6})
    def test_fifo_conforms(check):
        check()

``kind`` may also be the variant's class itself, not yet installed: it is registered for
the duration of each check (see :func:`registered`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmrec import registry
from mmrec.state import _flatten

__all__ = ["CHECKS", "SLOW_CHECKS", "Check", "CheckFailed", "VariantFailed", "check_variant", "parametrize", "registered",
           "toy_model", "variant_checks"]

CHUNK = 6  # the toy model's chunk_size: every check crosses several chunk borders
BATCH = 2
VOCAB = 50
SEED = 0
TOLERANCE = 1e-9  # float64: largest |difference| relative to the largest |value| compared
COMPILE_TOLERANCE = 1e-4  # float32, compiled against eager

# the model around the variant: small, every HDS level, heads of even width (RoPE)
BASE_MODEL = {
    "arch": "mmrec", "vocab_size": VOCAB, "d_model": 24, "n_layers": 2, "n_heads": 4, "ffn_dim": 40,
    "chunk_size": CHUNK, "recurrence": {"kind": "parallel"}, "memory": {"kind": "hds", "slots": 16, "banks": 2, "dim": 6},
}
SLOTS = {"recurrences": "recurrence", "memories": "memory"}

CHECKS = ("causality", "pieces", "resets", "save_load", "state_size", "gradients", "static_decode", "compile")
SLOW_CHECKS = frozenset({"compile"})


class CheckFailed(AssertionError):
    """A variant failed a check: ``variant`` (``"recurrences 'name'"``), ``check`` and ``detail``
    (what the check found) are attributes; the message says all three."""

    def __init__(self, variant: str, check: str, detail: str):
        self.variant, self.check, self.detail = variant, check, detail
        super().__init__(f"{variant} fails check {check!r}: {detail}")


class _Failure(AssertionError):
    """A check's own finding (as opposed to an error the variant raised while checked)."""


def _fail(message: str) -> None:
    raise _Failure(message)


# --------------------------------------------------------------------------- the model


def _variant_name(group: str, kind) -> str:
    if isinstance(kind, str):
        return kind
    try:
        return kind.Config.model_fields["kind"].default
    except (AttributeError, KeyError):
        raise TypeError(f"{kind!r} is neither a registered name nor a variant class with a Config that has a 'kind'") from None


@contextlib.contextmanager
def registered(group: str, cls: type, name: str | None = None):
    """Register the variant class ``cls`` in ``group`` as ``name`` (default: its
    ``Config``'s ``kind``) while inside, as if its package were installed, so that recipes
    select it by name. A name registered by another class is refused. ::

        with mmrec.testing.registered("recurrences", Retention):
            model = mmrec.build({"name": "t", "model": {..., "recurrence": {"kind": "retention"}}})
    """
    from mmrec import recipes, registry

    name = name or _variant_name(group, cls)
    found = registry.entries(group)
    if name in found:
        if found[name].target is not cls:
            raise ValueError(f"{group} name {name!r} is already registered by {found[name].package!r} ({found[name].value})")
        yield name
        return
    found[name] = registry.Entry(name, group, cls, "(mmrec.testing.registered)", f"{cls.__module__}:{cls.__qualname__}")
    forget = getattr(recipes.recipe_type, "cache_clear", lambda: None)  # the recipe type of the variants registered now
    forget()
    try:
        yield name
    finally:
        found.pop(name, None)
        forget()


def _model_dict(group: str, name: str, config: dict | None, model_overrides: dict | None) -> dict:
    group = registry.RENAMED_GROUPS.get(group, group)  # "scans", the recurrences' old group
    if group not in SLOTS:
        raise ValueError(f"group must be one of {sorted(SLOTS)}, got {group!r}")
    model = copy.deepcopy(BASE_MODEL)
    model[SLOTS[group]] = {**(config or {}), "kind": name}
    model.update(copy.deepcopy(model_overrides or {}))
    return model


def toy_model(group: str, kind, config: dict | None = None, *, model_overrides: dict | None = None,
              dtype: torch.dtype = torch.float64, seed: int = SEED):
    """The model the checks run on: ``BASE_MODEL`` with the variant in its slot (``config``:
    the variant's own fields) and ``model_overrides`` (top-level model fields) applied,
    initialised from ``seed`` without touching the global RNG, in ``dtype``, in eval mode."""
    import mmrec

    name = _variant_name(group, kind)
    with _registered_if_class(group, kind):
        recipe = mmrec.recipes.parse({"name": f"check-{name}", "model": _model_dict(group, name, config, model_overrides)})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = mmrec.LanguageModel(recipe.model)
    return model.to(dtype).eval()


def _registered_if_class(group: str, kind):
    return contextlib.nullcontext() if isinstance(kind, str) else registered(group, kind)


def _sizes(model) -> tuple[int, int, int]:
    """The model's chunk size, the checks' sequence length (three chunks and a few tokens)
    and the vocabulary size."""
    chunk = model.config.chunk_size
    return chunk, 3 * chunk + 4, model.config.vocab_size


def _tokens(vocab: int, *shape: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=generator)


# --------------------------------------------------------------------------- comparisons


def _difference(actual: Tensor, expected: Tensor) -> tuple[float, tuple[int, ...]]:
    """Largest |actual - expected| relative to the largest |expected|, and where."""
    diff = (actual.double() - expected.double()).abs()
    if diff.numel() == 0:
        return 0.0, ()
    if not torch.isfinite(diff).all():
        bad = (~torch.isfinite(diff)).nonzero()[0]
        return math.inf, tuple(bad.tolist())
    scale = max(expected.double().abs().max().item(), 1e-30)
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return diff.max().item() / scale, where


def _assert_logits(actual: Tensor, expected: Tensor, what: str, tolerance: float = TOLERANCE, offset: int = 0) -> None:
    if actual.shape != expected.shape:
        _fail(f"{what}: logits of shape {list(actual.shape)}, expected {list(expected.shape)}")
    error, where = _difference(actual, expected)
    if error > tolerance:
        at = f" (largest at sequence {where[0]}, position {where[1] + offset})" if len(where) >= 2 else ""
        _fail(f"{what}: logits differ by {error:.3g} of their scale, more than {tolerance:g}{at}{_rounding_hint(error, tolerance)}")


def _rounding_hint(error: float, tolerance: float) -> str:
    if tolerance < 1e-6 and 1e-9 < error < 1e-4:
        return ("; a difference at float32's rounding level in a float64 model: does the variant compute in float32 "
                "whatever its inputs' dtype (.float())? mmrec.ops.accumulation_dtype(z.dtype) keeps float64 as float64")
    return ""


def _assert_states(actual, expected, what: str, tolerance: float = TOLERANCE) -> None:
    if actual.position != expected.position:
        _fail(f"{what}: state at position {actual.position}, expected {expected.position}")
    for layer, (mine, theirs) in enumerate(zip(actual.layers, expected.layers)):
        mine, theirs = _flatten(mine), _flatten(theirs)
        if set(mine) != set(theirs):
            _fail(f"{what}: layer {layer}'s state has entries {sorted(mine)}, expected {sorted(theirs)}")
        for key in sorted(mine):
            a, b = mine[key], theirs[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                _fail(f"{what}: layer {layer}'s state {key!r} is {a.dtype} {list(a.shape)}, expected {b.dtype} {list(b.shape)}")
            error, _ = _difference(a, b)
            if error > tolerance:
                _fail(f"{what}: layer {layer}'s state {key!r} differs by {error:.3g} of its scale, more than {tolerance:g}"
                      + _rounding_hint(error, tolerance))


def _describe_shapes(state) -> dict[str, str]:
    return {f"layer {i} {key!r}": f"{list(t.shape)}" for i, layer in enumerate(state.layers) for key, t in _flatten(layer).items()}


# --------------------------------------------------------------------------- the checks
# Each takes the model (float64, eval) and returns None or a note; it raises _Failure.


def _check_causality(model) -> None:
    chunk, length, vocab = _sizes(model)
    ids = _tokens(vocab, BATCH, length, seed=1)
    with torch.no_grad():
        before = model(ids, return_state=False).logits
        # inside a chunk, a chunk's last token, the first token after a border, inside a later chunk
        for t in (chunk // 2 - 1, chunk - 1, chunk, 2 * chunk + 2):
            changed = ids.clone()
            # every later token replaced by another one
            changed[:, t + 1 :] = (ids[:, t + 1 :] + _tokens(vocab, BATCH, length - t - 1, seed=2 + t) % (vocab - 1) + 1) % vocab
            after = model(changed, return_state=False).logits
            leak = (after[:, : t + 1] - before[:, : t + 1]).abs()
            if leak.max() > 1e-12 * max(before.abs().max().item(), 1.0):
                first = int(leak.amax(dim=(0, 2)).nonzero()[0])
                _fail(f"changing the tokens after position {t} changed the logits at position {first} <= {t} "
                      f"(by up to {leak.max().item():.3g}): position t's output must depend on positions <= t only "
                      f"(with chunk_size {chunk}: a memory written from a chunk may be read only after that chunk's last token)")
            if (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() <= 1e-9:
                _fail(f"changing the tokens after position {t} changed none of the logits after it: the model ignores its input?")


def _splits(rng: torch.Generator, chunk: int, length: int) -> dict[str, list[int]]:
    ones = chunk + 2  # 1-token steps across a border
    half = chunk // 2
    cuts = sorted(set(torch.randint(1, length, (5,), generator=rng).tolist()))
    random = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
    return {
        "1-token steps, then the rest": [1] * ones + [length - ones],
        "a half-finished chunk, then pieces across borders": [half, chunk + 1, chunk + 2, length - half - 2 * chunk - 3],
        "random": random,
    }


def _check_pieces(model) -> None:
    chunk, length, vocab = _sizes(model)
    ids = _tokens(vocab, BATCH, length, seed=3)
    with torch.no_grad():
        whole = model(ids)
        for name, sizes in _splits(torch.Generator().manual_seed(4), chunk, length).items():
            state, logits, start = None, [], 0
            for size in sizes:
                out = model(ids[:, start : start + size], state=state)
                logits.append(out.logits)
                state, start = out.state, start + size
            what = f"fed in pieces {sizes} ({name}) with the carried State"
            _assert_logits(torch.cat(logits, 1), whole.logits, what + ", against one pass")
            _assert_states(state, whole.state, what + ", the final state against one pass's")


def _document_starts(chunk: int, length: int) -> Tensor:
    """``[BATCH, length]``: in the first sequence documents start inside a chunk and at a
    chunk border, in the second once, late."""
    resets = torch.zeros(BATCH, length, dtype=torch.bool)
    resets[0, [chunk + 2, 2 * chunk]] = True
    resets[-1, 2 * chunk + 1] = True
    return resets


def random_convolution_taps(model, seed: int = 0) -> None:
    """Give every short convolution (:class:`mmrec.layers.short_conv.ShortConv`) of ``model``
    random taps, in place: one that starts as the identity mixes no tokens, so a tap reaching
    across a document start would not show."""
    from mmrec.layers.short_conv import ShortConv

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, ShortConv)):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=conv.weight.dtype) * 0.5)


def _check_resets(model) -> str | None:
    chunk, length, vocab = _sizes(model)
    ids = _tokens(vocab, BATCH, length, seed=11)
    resets = _document_starts(chunk, length)
    random_convolution_taps(model, seed=14)
    if not model.supports_resets():
        try:
            model(ids, resets=resets)
        except ValueError as error:
            return f"takes no document resets, and says so: {error}"
        _fail("the model takes no document resets (supports_resets() is false) but did not refuse them with a ValueError")
    with torch.no_grad():
        whole = model(ids, resets=resets)
        for row in range(BATCH):
            for start in resets[row].nonzero().flatten().tolist():
                changed = ids.clone()
                changed[row, :start] = (ids[row, :start] + _tokens(vocab, start, seed=12 + start) % (vocab - 1) + 1) % vocab
                after = model(changed, resets=resets).logits
                _assert_logits(after[row : row + 1, start:], whole.logits[row : row + 1, start:],
                               f"with a document starting at position {start}, changing the tokens before it "
                               "(earlier documents) changed its logits: nothing may cross a document start",
                               offset=start)
                if (after[row, :start] - whole.logits[row, :start]).abs().max() <= 1e-9:
                    _fail(f"changing the tokens before position {start} changed none of their own logits")
        # pieces that end one token after a start: what a later piece carries must be that document's only
        cuts = sorted({start + 1 for start in resets.nonzero()[:, 1].tolist()} - {length})
        after_starts = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
        splits = {**_splits(torch.Generator().manual_seed(13), chunk, length), "ending after document starts": after_starts}
        for name, sizes in splits.items():
            state, logits, begin = None, [], 0
            for size in sizes:
                piece = slice(begin, begin + size)
                out = model(ids[:, piece], state=state, resets=resets[:, piece])
                logits.append(out.logits)
                state, begin = out.state, begin + size
            what = f"with document starts, fed in pieces {sizes} ({name}) with the carried State"
            _assert_logits(torch.cat(logits, 1), whole.logits, what + ", against one pass")
            _assert_states(state, whole.state, what + ", the final state against one pass's")
    return None


def _check_save_load(model) -> None:
    from mmrec.state import State

    chunk, length, vocab = _sizes(model)
    ids = _tokens(vocab, BATCH, length, seed=5)
    cut = chunk + chunk // 2  # mid-chunk: the chunk in progress is part of the state
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        whole = model(ids).logits
        state = model(ids[:, :cut]).state
        path = Path(tmp) / "state.safetensors"
        state.save(path)
        loaded = State.load(path, model)
        _assert_states(loaded, state, "a State saved and loaded back", tolerance=0.0)
        continued = model(ids[:, cut:], state=loaded).logits
    _assert_logits(continued, whole[:, cut:], f"continuing from a State saved and loaded after {cut} tokens, against one pass",
                   offset=cut)


def _check_state_size(model) -> None:
    chunk, length, vocab = _sizes(model)
    ids = _tokens(vocab, BATCH, 3 * length, seed=6)
    further = -(-length // chunk) * chunk  # whole chunks, at least length tokens: the same place in a chunk
    to_border = -length % chunk
    with torch.no_grad():
        for n in (length, length + to_border):
            short, long = (model(ids[:, :m]).state for m in (n, n + further))
            if short.nbytes() != long.nbytes():
                a, b = _describe_shapes(short), _describe_shapes(long)
                grown = [f"{key} {a.get(key)} -> {b.get(key)}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
                _fail(f"the state holds {short.nbytes()} bytes after {n} tokens and {long.nbytes()} after {n + further} "
                      f"(the same place in a chunk): it must not grow with the length ({'; '.join(grown)})")
            for i, layer in enumerate(long.layers):
                for key, t in _flatten(layer).items():
                    held, own = t.untyped_storage().nbytes(), t.numel() * t.element_size()
                    if held > own:
                        _fail(f"layer {i}'s state {key!r} ({list(t.shape)}, {own} bytes) is a view that keeps {held} bytes "
                              f"alive: return a copy (.clone()) of the slice you keep")


def _check_gradients(model) -> None:
    _, length, vocab = _sizes(model)
    model.train()
    ids = _tokens(vocab, BATCH, length + 1, seed=7)
    out = model(ids[:, :-1], return_aux_loss=True, return_state=False)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
    (loss if out.aux_loss is None else loss + out.aux_loss).backward()
    none = [n for n, p in model.named_parameters() if p.grad is None]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and n not in bad and not p.grad.any()]
    problems = []
    for what, names in (("no gradient", none), ("a non-finite gradient", bad), ("an all-zero gradient", zero)):
        if names:
            problems.append(f"{what}: {', '.join(names)}")
    if problems:
        hint, unused = "", none + zero
        if unused and all(".mdi." in n for n in unused):
            hint = (" (only MDI's parameters: the recurrence does not use log_decay, so the block's decay "
                    "projection is dead weight)")
        _fail("parameters with " + "; parameters with ".join(problems) + hint)


def _check_static_decode(model) -> str | None:
    import mmrec
    from mmrec.decode import StaticDecoder, supports_static

    chunk, length, vocab = _sizes(model)
    ids = _tokens(vocab, BATCH, length, seed=8)
    prompt = chunk // 2 + 1  # mid-chunk; the steps then cross three borders
    with torch.no_grad():
        start = model(ids[:, :prompt]).state
        eager, state = [], start
        for t in range(prompt, length):
            out = model(ids[:, t : t + 1], state=state)
            eager.append(out.logits)
            state = out.state
        eager = torch.cat(eager, 1)
        greedy = mmrec.generate(model, ids[:, :prompt], 8, temperature=0)
        _check_greedy(model, ids[:, :prompt], greedy)
        if not supports_static(model):
            return ("no static decode step (the memory's supports_static() is false: it lacks the static-decode "
                    "methods of mmrec.contracts.Memory): StaticDecoder refuses it and mmrec.generate decodes with eager "
                    "steps, the documented fallback; generate works")
        decoder = StaticDecoder(model, start, max_length=length, cuda_graph=False)
        static = torch.stack([decoder.step(ids[:, t : t + 1]).clone() for t in range(prompt, length)], 1)
        _assert_logits(static, eager, "StaticDecoder steps (cuda_graph=False), against eager steps", offset=prompt)
        _assert_states(decoder.state(), state, "StaticDecoder.state() after the steps, against the eager state")
        via_static = mmrec.generate(model, ids[:, :prompt], 8, temperature=0, cuda_graph=True)  # the static step on CPU
        if not torch.equal(via_static, greedy):
            _fail("mmrec.generate with the static step (cuda_graph=True) picked other tokens than with eager steps")
    return None


def _check_greedy(model, prompt: Tensor, generated: Tensor) -> None:
    """``generated`` is the greedy continuation of ``prompt`` by eager steps."""
    with torch.no_grad():
        out = model(prompt)
        for t in range(prompt.shape[1], generated.shape[1]):
            if not torch.equal(out.logits[:, -1].argmax(-1), generated[:, t]):
                _fail(f"mmrec.generate(temperature=0) did not pick the most likely token at position {t}")
            out = model(generated[:, t : t + 1], state=out.state)


def _check_compile(model, backend: str = "inductor") -> None:
    _, length, vocab = _sizes(model)
    model = copy.deepcopy(model).float()
    ids = _tokens(vocab, BATCH, length, seed=9)
    torch._dynamo.reset()  # a fresh cache: earlier models' recompilations must not count against this one
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    # with document starts too, for a model that takes them (training passes them compiled)
    inputs = {"": {}} | ({" with document resets": {"resets": _document_starts(_sizes(model)[0], length)}}
                         if model.supports_resets() else {})
    for what, extra in inputs.items():
        with torch.no_grad():
            expected = model(ids, return_state=False, **extra).logits
            try:
                got = compiled(ids, return_state=False, **extra).logits
            except Exception as error:  # a graph break is an error under fullgraph=True
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise _Failure(f"torch.compile(model, fullgraph=True, backend={backend!r}){what} failed: "
                               f"{type(error).__name__}: {first}") from error
        _assert_logits(got, expected, f"the compiled float32 forward{what} (backend {backend!r}), against eager",
                       COMPILE_TOLERANCE)
    torch._dynamo.reset()


_RUNNERS: dict[str, Callable] = {
    "causality": _check_causality, "pieces": _check_pieces, "resets": _check_resets, "save_load": _check_save_load,
    "state_size": _check_state_size, "gradients": _check_gradients, "static_decode": _check_static_decode,
    "compile": _check_compile,
}


@contextlib.contextmanager
def _one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy machine their
    waiting for each other makes the checks several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the API


@dataclass(frozen=True, eq=False)
class Check:
    """One check of one variant: call it to run it. Returns a note (``None`` when there is
    nothing to say beyond passing); raises ``AssertionError`` naming the check and the
    variant when it fails, including when the variant raises an error while checked."""

    name: str
    group: str
    kind: object  # the registered name, or the class
    config: dict | None = None
    model_overrides: dict | None = None
    compile_backend: str = "inductor"
    slow: bool = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "slow", self.name in SLOW_CHECKS)

    @property
    def variant(self) -> str:
        return f"{self.group} {_variant_name(self.group, self.kind)!r}"

    def __str__(self) -> str:
        return f"{_variant_name(self.group, self.kind)}-{self.name}"

    def __call__(self) -> str | None:
        model = toy_model(self.group, self.kind, self.config, model_overrides=self.model_overrides)
        kwargs = {"backend": self.compile_backend} if self.name == "compile" else {}
        try:
            with _registered_if_class(self.group, self.kind), torch.random.fork_rng(devices=[]), _one_thread():
                torch.manual_seed(SEED)
                return _RUNNERS[self.name](model, **kwargs)
        except _Failure as failure:
            raise CheckFailed(self.variant, self.name, str(failure)) from failure.__cause__
        except Exception as error:  # the variant broke while checked: that fails the check too
            where = "".join(traceback.format_exception_only(type(error), error)).strip()
            raise CheckFailed(self.variant, self.name, f"it raised {where}") from error


def variant_checks(group: str, kind, config: dict | None = None, *, model_overrides: dict | None = None,
                   checks: Iterable[str] | None = None, slow: bool = True, compile_backend: str = "inductor") -> list[Check]:
    """The checks of the variant ``kind`` of ``group`` (``"recurrences"`` or ``"memories"``), as
    callables a test can parametrize over (``str(check)`` is ``"<kind>-<check>"``).

    ``config``: the variant's own fields (e.g. ``{"slots": 4}``); ``model_overrides``:
    fields of the toy model (``BASE_MODEL``), e.g. the other slot's variant or
    ``"n_heads"``; ``checks``: the names to run (default: all of ``CHECKS``);
    ``slow=False`` leaves out ``SLOW_CHECKS`` (``compile``); ``compile_backend``: the
    ``torch.compile`` backend of that check. The recipe is validated here, so a config
    the variant refuses fails at once (``mmrec.recipes.RecipeError``)."""
    toy_model(group, kind, config, model_overrides=model_overrides)  # validate now, not in every check
    names = list(CHECKS if checks is None else checks)
    unknown = [name for name in names if name not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; the checks are {', '.join(CHECKS)}")
    return [Check(name, group, kind, config, model_overrides, compile_backend) for name in names
            if slow or name not in SLOW_CHECKS]


def check_variant(group: str, kind, config: dict | None = None, *, model_overrides: dict | None = None,
                  checks: Iterable[str] | None = None, slow: bool = True, compile_backend: str = "inductor") -> dict[str, str]:
    """Run the checks of :func:`variant_checks` (same arguments) and return
    ``{check: "ok" or a note}``; when any fails, raise one ``AssertionError``
    (:class:`VariantFailed`) naming the variant and each failed check with what it found."""
    report, failures = {}, []
    for check in variant_checks(group, kind, config, model_overrides=model_overrides, checks=checks, slow=slow,
                                compile_backend=compile_backend):
        try:
            report[check.name] = check() or "ok"
        except CheckFailed as failure:
            failures.append(failure)
            report[check.name] = "FAILED"
    if failures:
        raise VariantFailed(failures, len(report))
    return report


class VariantFailed(AssertionError):
    """What :func:`check_variant` raises: ``failures``, the :class:`CheckFailed` of each
    failed check (``failed``: their names)."""

    def __init__(self, failures: list[CheckFailed], total: int):
        self.failures = failures
        self.failed = [f.check for f in failures]
        lines = "\n".join(f"  {f.check}: {f.detail}" for f in failures)
        super().__init__(f"{failures[0].variant} fails {len(failures)} of {total} checks ({', '.join(self.failed)}):\n{lines}")


def parametrize(group: str, kind, config: dict | None = None, *, argname: str = "check", **kwargs):
    """A ``pytest.mark.parametrize`` over the variant's checks (arguments as
    :func:`variant_checks`), one test per check, ``slow`` ones marked ``pytest.mark.slow``::

        @mmrec.testing.parametrize("recurrences", "complex")
        def test_complex_conforms(check):
            check()
    """
    import pytest

    params = [pytest.param(check, id=check.name, marks=[pytest.mark.slow] if check.slow else [])
              for check in variant_checks(group, kind, config, **kwargs)]
    return pytest.mark.parametrize(argname, params)

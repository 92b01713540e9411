import importlib.metadata
import warnings

import pytest

from mmrec import recipes, registry


class FakeDist:
    name = "fake-plugin"


def fake_entry_points(extra):
    """``importlib.metadata.entry_points`` with extra entry points added to their groups."""
    real = importlib.metadata.entry_points

    def entry_points(group):
        found = list(real(group=group))
        for ep in extra:
            if ep.group == group:
                found.append(ep)
        return found

    return entry_points


def make_entry_point(name, value, group):
    ep = importlib.metadata.EntryPoint(name, value, group)
    # EntryPoint is immutable; attach a distribution the way importlib does for installed ones
    object.__setattr__(ep, "dist", FakeDist())
    return ep


@pytest.fixture
def with_entry_points(monkeypatch):
    def install(*eps):
        monkeypatch.setattr(registry, "entry_points", fake_entry_points(eps))
        registry.refresh()
        recipes.recipe_type.cache_clear()

    yield install
    monkeypatch.undo()
    registry.refresh()
    recipes.recipe_type.cache_clear()


def test_builtins_are_registered_with_their_package():
    assert {"parallel", "exact"} <= set(registry.names("scans"))
    assert "hds" in registry.names("memories")
    assert {"mmrec", "transformer", "rmsnorm", "swiglu", "mdi"} <= set(registry.names("layers"))
    assert registry.entries("scans")["parallel"].package == "mmrec"


def test_unknown_name_lists_registered_and_closest():
    with pytest.raises(registry.UnknownNameError) as info:
        registry.get("scans", "paralel")
    assert "registered: " in str(info.value) and "exact, parallel" in str(info.value)
    assert "did you mean 'parallel'?" in str(info.value)
    with pytest.raises(ValueError, match="groups"):
        registry.names("kernels")


def test_broken_plugin_warns_and_builtins_still_load(with_entry_points):
    with_entry_points(make_entry_point("broken", "mmrec_no_such_module:Thing", "mmrec.memories"))
    with pytest.warns(UserWarning, match="fake-plugin.*broken"):
        names = registry.names("memories")
    assert "hds" in names and "broken" not in names
    import mmrec

    assert mmrec.build("tiny") is not None


def test_duplicate_name_warns_and_keeps_the_first(with_entry_points):
    with_entry_points(make_entry_point("parallel", "mmrec.layers.exact_recurrence:ExactRecurrence", "mmrec.scans"))
    with pytest.warns(UserWarning, match="already registered"):
        target = registry.get("scans", "parallel")
    assert target.__name__ == "ParallelRecurrence"


def test_a_new_variant_joins_the_recipe_schema(with_entry_points):
    # register the built-in exact recurrence a second time under another name and kind
    import mmrec.layers.exact_recurrence as exact
    from typing import Literal

    from pydantic import ConfigDict

    class AnotherConfig(exact.ExactRecurrence.Config):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["another"] = "another"

    class Another(exact.ExactRecurrence):
        Config = AnotherConfig

    exact.Another = Another
    try:
        with_entry_points(make_entry_point("another", "mmrec.layers.exact_recurrence:Another", "mmrec.scans"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            recipe = recipes.load("tiny", ["model.recurrence.kind=another"])
        assert type(recipe.model.recurrence).__name__ == "AnotherConfig"
        import mmrec

        model = mmrec.build(recipe)
        assert type(model.blocks[0].recurrence).__name__ == "Another"
    finally:
        del exact.Another

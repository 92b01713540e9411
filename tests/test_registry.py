import importlib.metadata
import warnings

import pytest

from mmrec import recipes, registry


class FakeDist:
    def __init__(self, name="fake-plugin"):
        self.name = name


def fake_entry_points(extra):
    """``importlib.metadata.entry_points`` with extra entry points added to their groups:
    before the installed ones (as for a package earlier on ``sys.path``) where the entry
    point has ``first=True`` set, after them otherwise."""
    real = importlib.metadata.entry_points

    def entry_points(group):
        mine = [ep for ep in extra if ep.group == group]
        return [ep for ep in mine if getattr(ep, "first", False)] + list(real(group=group)) + [ep for ep in mine if not getattr(ep, "first", False)]

    return entry_points


def make_entry_point(name, value, group, package="fake-plugin", first=False):
    ep = importlib.metadata.EntryPoint(name, value, group)
    # EntryPoint is immutable; attach a distribution the way importlib does for installed ones
    object.__setattr__(ep, "dist", FakeDist(package))
    object.__setattr__(ep, "first", first)
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
    assert {"parallel", "exact"} <= set(registry.names("recurrences"))
    assert "hds" in registry.names("memories")
    assert {"mmrec", "transformer", "rmsnorm", "swiglu", "mdi"} <= set(registry.names("layers"))
    assert registry.entries("recurrences")["parallel"].package == "mmrec"


def test_unknown_name_lists_registered_and_closest():
    with pytest.raises(registry.UnknownNameError) as info:
        registry.get("recurrences", "paralel")
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
    with_entry_points(make_entry_point("parallel", "mmrec.layers.exact_recurrence:ExactRecurrence", "mmrec.recurrences"))
    with pytest.warns(UserWarning, match="already registered"):
        target = registry.get("recurrences", "parallel")
    assert target.__name__ == "ParallelRecurrence"


def test_a_new_variant_joins_the_recipe_schema(with_entry_points):
    # register the built-in exact recurrence a second time under another name and kind
    from typing import Literal

    from pydantic import ConfigDict

    import mmrec.layers.exact_recurrence as exact

    class AnotherConfig(exact.ExactRecurrence.Config):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["another"] = "another"

    class Another(exact.ExactRecurrence):
        Config = AnotherConfig

    exact.Another = Another
    try:
        with_entry_points(make_entry_point("another", "mmrec.layers.exact_recurrence:Another", "mmrec.recurrences"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            recipe = recipes.load("tiny", ["model.recurrence.kind=another"])
        assert type(recipe.model.recurrence).__name__ == "AnotherConfig"
        import mmrec

        model = mmrec.build(recipe)
        assert type(model.blocks[-1].recurrence).__name__ == "Another"  # tiny's layer 0 is its delta layer
    finally:
        del exact.Another


def test_a_plugin_never_shadows_a_builtin(with_entry_points):
    # a plugin registering "hds", found before mmrec on sys.path (#21)
    with_entry_points(make_entry_point("hds", "mmrec.layers.window_memory:WindowMemory", "mmrec.memories",
                                       package="shadow-plugin", first=True))
    with pytest.warns(UserWarning) as caught:
        entry = registry.entries("memories")["hds"]
    assert entry.package == "mmrec" and entry.target.__name__ == "HDSMemory"
    message = " ".join(str(w.message) for w in caught)
    assert "'shadow-plugin'" in message and "'mmrec'" in message and "precedence" in message
    import mmrec

    model = mmrec.build("tiny")
    assert type(model.blocks[-1].memory).__name__ == "HDSMemory"


def test_between_plugins_the_first_package_name_wins_whatever_the_path_order(with_entry_points):
    for first in (False, True):
        with_entry_points(
            make_entry_point("twin", "mmrec.layers.window_memory:WindowMemory", "mmrec.memories", package="zz-plugin", first=first),
            make_entry_point("twin", "mmrec.layers.hds_memory:HDSMemory", "mmrec.memories", package="aa-plugin"),
        )
        with pytest.warns(UserWarning, match="'zz-plugin'.*already registered by 'aa-plugin'.*sorts first"):
            entry = registry.entries("memories")["twin"]
        assert entry.package == "aa-plugin" and entry.target.__name__ == "HDSMemory"


def test_a_name_whose_plugin_failed_to_load_says_why(with_entry_points):
    with_entry_points(make_entry_point("broken", "mmrec_no_such_module:Thing", "mmrec.memories", package="broken-plugin"))
    with pytest.warns(UserWarning, match="broken-plugin"):
        registry.names("memories")
    with pytest.raises(registry.UnknownNameError) as info:
        registry.get("memories", "broken")
    message = str(info.value)
    assert "unknown memory 'broken'" in message and "'broken-plugin'" in message
    assert "failed to load" in message and "mmrec_no_such_module" in message
    # the recipe validator's message says the same
    with pytest.raises(recipes.RecipeError, match="'broken-plugin'.*failed to load.*mmrec_no_such_module"):
        recipes.load("tiny", ["model.memory.kind=broken"])


def test_a_plugin_calling_sys_exit_at_import_is_skipped(with_entry_points, tmp_path, monkeypatch):
    (tmp_path / "mmrec_exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with_entry_points(make_entry_point("exiting", "mmrec_exiting_plugin:Thing", "mmrec.recurrences", package="exiting-plugin"))
    with pytest.warns(UserWarning, match=r"'exiting-plugin'.*SystemExit\(3\).*sys.exit"):
        names = registry.names("recurrences")
    assert "exiting" not in names and "parallel" in names
    with pytest.raises(registry.UnknownNameError, match="exiting-plugin.*sys.exit"):
        registry.get("recurrences", "exiting")


def test_keyboard_interrupt_in_a_plugin_import_is_not_swallowed(with_entry_points, tmp_path, monkeypatch):
    (tmp_path / "mmrec_interrupted_plugin.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with_entry_points(make_entry_point("interrupted", "mmrec_interrupted_plugin:Thing", "mmrec.recurrences"))
    with pytest.raises(KeyboardInterrupt):
        registry.names("recurrences")


def test_a_plugin_on_the_old_scans_group_still_loads_with_a_deprecation_warning(with_entry_points):
    with_entry_points(make_entry_point("old-style", "mmrec.layers.exact_recurrence:ExactRecurrence", "mmrec.scans",
                                       package="old-plugin"))
    with pytest.warns(DeprecationWarning, match=r"'old-plugin' registers 'old-style' under the entry-point group 'mmrec.scans', now 'mmrec.recurrences'"):
        assert "old-style" in registry.names("recurrences")
    with pytest.warns(DeprecationWarning, match="'scans' is now 'recurrences'"):
        assert registry.get("scans", "old-style") is registry.get("recurrences", "old-style")

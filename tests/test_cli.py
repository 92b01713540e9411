"""``python -m mmrec``: the list and schema commands."""

import json

import mmrec
from mmrec.__main__ import main


def test_schema_to_a_file_says_where_it_went(tmp_path, capsys):
    out = tmp_path / "recipe.schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert f"wrote the recipe schema to {out}" in capsys.readouterr().out
    assert json.loads(out.read_text()) == mmrec.recipes.schema()


def test_list_names_every_registered_variant(capsys):
    assert main(["list"]) == 0
    shown = capsys.readouterr().out
    for group in mmrec.registry.GROUPS:
        assert all(name in shown for name in mmrec.registry.names(group))


def test_list_says_which_layers_a_recipe_selects(capsys):
    assert main(["list"]) == 0
    shown = capsys.readouterr().out
    assert "mmrec.layers (model.arch):" in shown and "mmrec.recurrences (model.recurrence.kind):" in shown
    assert "building blocks of the above, not selected by a recipe:" in shown and "rmsnorm" in shown.split("building blocks")[1]

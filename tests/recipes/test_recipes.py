import json
from pathlib import Path

import pytest
import torch

import mmrec
from mmrec.recipes import RecipeError

SEVEN_B_PARAMETERS = 7_063_546_176


def meta_count(name):
    with torch.device("meta"):
        return mmrec.build(name).num_parameters()


@pytest.mark.parametrize("name", mmrec.recipes.names())
def test_shipped_recipes_validate_and_build_on_meta(name):
    recipe = mmrec.recipes.load(name)
    assert recipe.name == name
    assert meta_count(name) > 0


def test_7b_has_the_seeds_shape_and_size():
    recipe = mmrec.recipes.load("7b")
    m = recipe.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.head_dim, m.ffn_dim) == (32000, 4096, 24, 32, 128, 11008)
    assert (m.memory.slots, m.memory.dim, m.memory.banks, m.max_seq_len, m.decay_init, m.dropout, m.bias) == (1024, 512, 8, 32768, 0.99, 0.1, False)
    count = meta_count("7b")
    assert 6.5e9 <= count <= 7.5e9
    assert count == SEVEN_B_PARAMETERS
    assert f"{SEVEN_B_PARAMETERS:,}" in (Path(__file__).parents[2] / "README.md").read_text()


@pytest.mark.parametrize("name,target", [("small", 125e6), ("transformer-small", 125e6), ("1b", 1.3e9), ("transformer-1b", 1.3e9)])
def test_sizes_are_within_15_percent_of_their_names(name, target):
    assert abs(meta_count(name) - target) / target < 0.15


def test_baselines_match_their_mmrec_sizes():
    for size in ("tiny", "small", "1b"):
        ratio = meta_count(f"transformer-{size}") / meta_count(size)
        assert 0.85 < ratio < 1.15, size


def test_load_from_path_and_object(tmp_path):
    recipe = mmrec.recipes.load("tiny")
    path = tmp_path / "mine.json"
    path.write_text(recipe.model_dump_json())
    assert mmrec.recipes.load(str(path)) == recipe
    assert mmrec.recipes.load(recipe) is recipe
    assert isinstance(mmrec.build(str(path)), mmrec.LanguageModel)


def test_overrides_are_validated_by_the_schema():
    recipe = mmrec.recipes.load("tiny", ["train.lr=1e-4", "model.n_layers=2", "model.recurrence.kind=exact"])
    assert recipe.train.lr == 1e-4 and recipe.model.n_layers == 2 and recipe.model.recurrence.kind == "exact"
    with pytest.raises(RecipeError, match=r"train\.lr"):
        mmrec.recipes.load("tiny", ["train.lr=fast"])


@pytest.mark.parametrize("override, expected", [
    ("train.lr=inf", "train.lr: Input should be a finite number"),
    ("train.lr=NaN", "train.lr: Input should be a finite number"),
    ("train.lr=1e39", "train.lr: Input should be less than or equal to 1"),
    ("train.lr=0", "train.lr: Input should be greater than 0"),
    ("train.min_lr=Infinity", "train.min_lr: Input should be a finite number"),
    ("train.grad_clip=Infinity", "train.grad_clip: Input should be a finite number"),
    ("train.weight_decay=Infinity", "train.weight_decay: Input should be a finite number"),
    ("train.weight_decay=500", "train.lr x train.weight_decay is 1.5"),
    ("train.betas=[0.9,1.0]", "train.betas[1]: Input should be less than 1"),
    ("train.betas=[-0.1,0.9]", "train.betas[0]: Input should be greater than or equal to 0"),
    ("train.betas=[0.9,NaN]", "train.betas[1]: Input should be a finite number"),
    ("train.val_fraction=NaN", "train.val_fraction: Input should be a finite number"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    ("train.seed=18446744073709551616", "train.seed: Input should be less than"),
    ("train.bpe_vocab_size=100", "train.bpe_vocab_size: Input should be greater than or equal to 256"),
    ("model.dropout=NaN", "model.dropout: Input should be a finite number"),
    ("model.init_std=Infinity", "model.init_std: Input should be a finite number"),
    ("model.norm_eps=Infinity", "model.norm_eps: Input should be a finite number"),
    ("model.d_model=Infinity", "model.d_model: Input should be a finite number"),
    ("model.recurrence_dropout=NaN", "model.recurrence_dropout: Input should be a finite number"),
    # a variant's config, which sets no allow_inf_nan of its own
    ("model.planning.lambda_p=Infinity", "model.planning.lambda_p: Input should be a finite number (got inf)"),
])
def test_numbers_must_be_finite_and_in_range(override, expected):
    assert expected in error_of([override])


def test_transformer_numbers_must_be_finite():
    assert "model.rope_base: Input should be a finite number" in error_of(["model.rope_base=Infinity"], data="transformer-tiny")


def error_of(overrides=(), data=None):
    with pytest.raises(RecipeError) as info:
        mmrec.recipes.load(data if data is not None else "tiny", overrides)
    return str(info.value)


def test_unknown_field_names_its_path():
    assert "model.memory.slotz: unknown field" in error_of(["model.memory.slotz=4"])
    assert "train.learning_rate: unknown field" in error_of(["train.learning_rate=4"])


def test_unknown_field_suggests_the_closest_field_of_its_own_section():
    assert "train.max_steps: unknown field; did you mean train.steps?" in error_of(["train.max_steps=4"])
    assert "did you mean model.d_model?" in error_of(["model.d_modle=64"])
    assert "did you mean model.memory.slots?" in error_of(["model.memory.slot=4"])  # the variant's own fields
    assert "did you mean model.planning.lambda_p?" in error_of(["model.planning.lambda=0.1"])  # a nested config
    assert "did you mean" not in error_of(["train.zzzzzz=1"])


def test_wrong_type_names_its_path():
    message = error_of(["model.d_model=\"wide\""])
    assert "model.d_model" in message and "integer" in message
    assert "model.memory.levels[1]" in error_of(["model.memory.levels=[0, 7]"])


def test_memory_banks_that_do_not_divide_the_heads_fail_validation_not_the_build():
    message = error_of(["model.memory.banks=3"])  # tiny has 4 heads
    assert message.count("\n") == 1 and "model:" in message and "memory.banks (3) must divide n_heads (4)" in message
    mmrec.recipes.load("tiny", ["model.memory.banks=4"])  # and a fitting one passes


@pytest.mark.parametrize("override,path,suggestion", [
    ("model.recurrence.kind=paralell", "model.recurrence.kind", "parallel"),
    ("model.memory.kind=hsd", "model.memory.kind", "hds"),
    ("model.arch=mmrecc", "model.arch", "mmrec"),
])
def test_unknown_variant_names_path_registered_and_closest(override, path, suggestion):
    message = error_of([override])
    assert f"{path}: unknown" in message
    assert f"did you mean {suggestion!r}" in message
    assert "registered:" in message


def test_unknown_recipe_name_suggests_the_closest():
    assert "did you mean 'tiny'" in error_of(data="tiyn")


def test_invalid_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    assert "not valid JSON" in error_of(data=str(path))


def test_schema_exports_every_variant():
    schema = json.dumps(mmrec.recipes.schema())
    for name in ("parallel", "exact", "hds", "mmrec", "transformer"):
        assert f'"{name}"' in schema
    assert "TrainConfig" in schema


def test_cli_list_and_schema(capsys, tmp_path):
    from mmrec.__main__ import main

    main(["list"])
    out = capsys.readouterr().out
    for group, name in (("mmrec.recurrences", "parallel"), ("mmrec.memories", "hds"), ("mmrec.layers", "rmsnorm")):
        assert group in out and name in out
    assert "mmrec.layers.hds_memory:HDSMemory" in out
    main(["schema", "--out", str(tmp_path / "schema.json")])
    assert json.loads((tmp_path / "schema.json").read_text())["title"] == "Recipe"


@pytest.mark.parametrize("mmrec_recipe", ["tiny", "small", "1b", "shakespeare-char"])
def test_each_transformer_baseline_has_its_mmrec_recipes_size(mmrec_recipe):
    # docs/design.md, section 3: a model is measured against the Transformer baseline of the same size
    with torch.device("meta"):
        ours = mmrec.build(mmrec_recipe).num_parameters()
        baseline = mmrec.build(f"transformer-{mmrec_recipe}").num_parameters()
    assert abs(baseline - ours) / ours < 0.005, (ours, baseline)


def test_a_transformer_with_odd_heads_is_refused_by_validation():
    """RoPE rotates pairs of channels: an odd head width failed at the first forward pass."""
    assert "must be even" in error_of(["model.d_model=66", "model.n_heads=2"], data=mmrec.recipes.load("transformer-tiny").model_dump(mode="json"))


@pytest.mark.parametrize("size", ["shakespeare-char", "small", "1b"])
def test_size_matched_hybrid_candidates_have_their_transformers_size(size):
    # the hybrids timed and scored against the Transformer for the default (docs/benchmarks.md)
    path = Path(__file__).parents[2] / "docs" / "results" / "recipes" / f"{size}-hybrid-matched.json"
    with torch.device("meta"):
        ours = mmrec.build(str(path)).num_parameters()
        baseline = mmrec.build(f"transformer-{size}").num_parameters()
    assert abs(baseline - ours) / ours < 0.005, (ours, baseline)


BENCHMARK_RECIPES = sorted((Path(__file__).parents[2] / "docs" / "results" / "recipes").glob("*.json"))


@pytest.mark.parametrize("path", BENCHMARK_RECIPES, ids=lambda p: p.stem)
def test_benchmark_recipes_still_validate(path):
    """The recipes docs/benchmarks.md names, with its commands: a schema change must not
    leave them unloadable (their size is counted without building)."""
    from mmrec.sizing import estimate_parameters

    recipe = mmrec.recipes.load(str(path))
    assert recipe.name == path.stem
    assert estimate_parameters(recipe.model)[0] > 0


@pytest.mark.parametrize("option", ["gated-integration", "pe", "own-value", "level3"])
def test_single_seed_option_ablations_keep_smalls_size(option):
    from mmrec.sizing import estimate_parameters

    path = Path(__file__).parents[2] / "docs" / "results" / "recipes" / f"small-{option}.json"
    ours = estimate_parameters(mmrec.recipes.load(str(path)).model)[0]
    small = estimate_parameters(mmrec.recipes.load("small").model)[0]
    assert abs(ours - small) / small < 0.001, (ours, small)

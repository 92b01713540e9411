"""Recipes: typed, validated JSON that says which model to build and how to train it.

A recipe has ``name``, ``model`` and ``train``. ``model`` is a discriminated union on
``arch`` over the installed block configs, and each block's variant slots (an MM-Rec
block's ``recurrence`` and ``memory``) are discriminated unions on ``kind`` over the
installed variants, so plugins extend the schema by being installed. Every error names
the JSON path of the problem, and unknown names the closest registered match. Numbers
must be finite everywhere: ``inf`` or ``nan`` in any field, a plugin's included, is an
error naming the field.
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, create_model
from pydantic_core import PydanticCustomError

from mmrec import registry
from mmrec.recipes.train_config import TrainConfig

__all__ = ["RecipeError", "TrainConfig", "load", "names", "parse", "recipe_type", "schema"]

NOUNS = {"layers": "architecture", "recurrences": "recurrence", "memories": "memory"}


class RecipeError(ValueError):
    """An invalid recipe; the message names each problem's JSON path."""


class RecipeBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    description: str = ""
    model: Any
    train: TrainConfig = Field(default_factory=TrainConfig)


def _tagged_union(configs: dict[str, type[BaseModel]], field: str, group: str, default: str):
    """A union of ``configs`` keyed by their ``field`` value, which may be omitted for ``default``."""

    def tag_of(value: Any) -> Any:
        return value.get(field, default) if isinstance(value, dict) else getattr(value, field, default)

    if len(configs) == 1:  # pydantic needs two members for a discriminated union; check the tag by hand
        (name, only), = configs.items()

        def check(value: Any) -> Any:
            tag = tag_of(value)
            if tag != name:
                raise PydanticCustomError(
                    "union_tag_invalid",
                    "Input tag {tag!r} found using {discriminator!r} does not match any of the expected tags: {expected_tags}",
                    {"tag": tag, "discriminator": field, "expected_tags": repr(name), "group": group},
                )
            return value

        return Annotated[only, BeforeValidator(check)]
    members = tuple(Annotated[config, Tag(name)] for name, config in configs.items())
    return Annotated[Union[members], Discriminator(tag_of)]  # noqa: UP007


def _variant_configs(group: str) -> dict[str, type[BaseModel]]:
    return {name: entry.target.Config for name, entry in registry.entries(group).items() if hasattr(entry.target, "Config")}


def _block_configs() -> dict[str, type[BaseModel]]:
    """Configs of registered layers that are whole-model architectures (they have ``arch``)."""
    return {name: config for name, config in _variant_configs("layers").items() if "arch" in config.model_fields}


@functools.cache
def recipe_type() -> type[BaseModel]:
    """The ``Recipe`` pydantic model for the variants installed now."""
    block_configs = {}
    for name, config in _block_configs().items():
        slots = {
            slot: (_tagged_union(_variant_configs(group), "kind", group, config.model_fields[slot].default.kind), config.model_fields[slot].default.kind)
            for slot, group in getattr(config, "variant_groups", {}).items()
        }
        narrowed = create_model(config.__name__, __base__=config, __module__=config.__module__, **{
            slot: (annotation, Field(default_factory=_default_of(annotation, kind))) for slot, (annotation, kind) in slots.items()
        })
        block_configs[name] = narrowed
    if not block_configs:
        raise RecipeError(
            "no model architectures are registered: the mmrec.layers entry points come from the installed "
            "package's metadata, so install mmrec (pip install -e .) rather than only putting it on PYTHONPATH"
        )
    model_union = _tagged_union(block_configs, "arch", "layers", "mmrec")
    return create_model("Recipe", __base__=RecipeBase, model=(model_union, ...))


def _default_of(annotation, kind: str):
    """A factory for the slot's default: the registered variant ``kind`` with its defaults."""
    adapter = TypeAdapter(annotation)
    return lambda: adapter.validate_python({"kind": kind})


def schema() -> dict:
    """JSON schema of recipes (for editors), including installed plugins' configs."""
    return recipe_type().model_json_schema()


def names() -> list[str]:
    """Recipes shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".json"))


def _read(source: str | Path) -> dict:
    path = Path(source)
    if not (path.suffix == ".json" or path.exists()):
        if str(source) not in names():
            known = names()
            hint = registry.closest(str(source), known)
            raise RecipeError(f"unknown recipe {str(source)!r}: not a file and not a shipped recipe ({', '.join(known)})" + (f"; did you mean {hint!r}?" if hint else ""))
        text = resources.files(__package__).joinpath(f"{source}.json").read_text()
        path = Path(f"{source}.json")
    else:
        try:
            text = path.read_text()
        except OSError as error:
            raise RecipeError(f"cannot read recipe {str(path)!r}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecipeError(f"recipe {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a JSON object, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set dotted fields, e.g. ``"train.lr=3e-4"``; values are JSON, else plain strings."""
    data = json.loads(json.dumps(data))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {override!r} must look like section.field=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {override!r}: {'.'.join(parents[: i + 1])} is not an object")
            node = child
        node[leaf] = value
    return data


def parse(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> BaseModel:
    """Validate a recipe given as a dict."""
    data = apply_overrides(data, overrides) if overrides else data
    name = data.get("name", "?") if isinstance(data, dict) else "?"
    try:
        recipe = recipe_type().model_validate(data)
    except ValidationError as error:
        problems = "\n".join(f"  {_describe(e, data)}" for e in error.errors())
        raise RecipeError(f"invalid recipe {name!r}:\n{problems}") from None
    # the train and model sections refuse inf and nan themselves; this also covers the
    # variants' configs (and plugins'), which pydantic lets through by default
    bad = _non_finite(recipe.model_dump(), "")
    if bad:
        problems = "\n".join(f"  {path}: Input should be a finite number (got {value!r})" for path, value in bad)
        raise RecipeError(f"invalid recipe {name!r}:\n{problems}")
    return recipe


def _non_finite(value: Any, path: str) -> list[tuple[str, float]]:
    """``(path, value)`` of every float in ``value`` (a recipe dump) that is inf or nan."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(path, value)]
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _non_finite(item, f"{path}.{key}" if path else str(key))]
    if isinstance(value, (list, tuple)):
        return [bad for i, item in enumerate(value) for bad in _non_finite(item, f"{path}[{i}]")]
    return []


def load(source: Any, overrides: list[str] | tuple[str, ...] = ()) -> BaseModel:
    """A recipe from a recipe object, a dict, a JSON file path, or a shipped name ("tiny")."""
    if isinstance(source, BaseModel):
        if not overrides:
            return source
        source = source.model_dump(mode="json")
    data = source if isinstance(source, dict) else _read(source)
    return parse(data, overrides)


def _all_tags() -> set[str]:
    return {name for group in registry.GROUPS for name in registry.names(group)}


def _json_path(loc: tuple, data: Any) -> str:
    """The input's path for a pydantic error location, without union tag components."""
    tags, path, node = _all_tags(), "", data
    for part in loc:
        if isinstance(part, int) and isinstance(node, list):
            path += f"[{part}]"
            node = node[part] if part < len(node) else None
            continue
        if isinstance(node, dict) and part not in node and (part in tags or str(part).endswith("()")):
            continue  # the union member or discriminator pydantic tried, not a key of the input
        path += f".{part}" if path else str(part)
        node = node.get(part) if isinstance(node, dict) else None
    return path or "(root)"


def _describe(error: dict, data: Any) -> str:
    path = _json_path(error["loc"], data)
    kind = error["type"]
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        group = ctx.get("group") or _group_at(error["loc"])
        field, tag = ("arch" if group == "layers" else "kind"), ctx.get("tag")
        known = list(_block_configs()) if group == "layers" else list(_variant_configs(group))
        package = registry.KNOWN_PLUGINS.get((group, str(tag)))
        return f"{path}.{field}: " + registry.unknown_name_message(group, NOUNS[group], str(tag), known, package)
    if kind == "extra_forbidden":
        known = _fields_at(error["loc"][:-1], data)
        hint = registry.closest(str(error["loc"][-1]), known)
        if hint is None:
            return f"{path}: unknown field"
        parent = path.rpartition(".")[0]
        return f"{path}: unknown field; did you mean {parent + '.' if parent else ''}{hint}?"
    return f"{path}: {error['msg']}" + (f" (got {error['input']!r})" if kind not in ("missing",) and not isinstance(error.get("input"), (dict, list)) else "")


def _group_at(loc: tuple) -> str:
    """The registry group of the innermost variant slot in ``loc``."""
    slots = {slot: group for config in _block_configs().values() for slot, group in getattr(config, "variant_groups", {}).items()}
    return next((slots[part] for part in reversed(loc) if part in slots), "layers")


def _fields_at(loc: tuple, data: Any) -> list[str]:
    """The field names the config at ``loc`` (a pydantic error location) accepts: the
    recipe's, ``train``'s, the model's architecture's, or a variant's or nested config's."""
    config: Any = RecipeBase
    node = data
    for part in loc:
        if not isinstance(node, dict) or not isinstance(part, str) or part not in node:
            continue  # a union tag pydantic inserted, not a key of the input
        node = node[part]
        if config is RecipeBase and part == "model":
            arch = node.get("arch", "mmrec") if isinstance(node, dict) else None
            config = _block_configs().get(arch)
        elif config is RecipeBase and part == "train":
            config = TrainConfig
        elif config is not None and part in getattr(config, "variant_groups", {}):
            kind = node.get("kind", config.model_fields[part].default.kind) if isinstance(node, dict) else None
            config = _variant_configs(config.variant_groups[part]).get(kind)
        elif config is not None and part in config.model_fields:
            config = _nested_config(config.model_fields[part].annotation)
        else:
            config = None
        if config is None:
            return []
    return list(config.model_fields) if config is not None else []


def _nested_config(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in ``annotation`` (``Model`` or ``Model | None``), if any."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None

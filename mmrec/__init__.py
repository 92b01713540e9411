"""mmrec: MM-Rec (Multi-Memory Recurrence) language models for PyTorch.

    model = mmrec.build("tiny")        # a shipped recipe name, a JSON path, or a recipe object
    out = model(input_ids)             # out.logits [B, T, vocab]
"""

from __future__ import annotations

from mmrec import ops, recipes, registry
from mmrec.generate import generate
from mmrec.model import LanguageModel, ModelOutput
from mmrec.state import State, StateError

__all__ = ["LanguageModel", "ModelOutput", "State", "StateError", "build", "generate", "ops", "recipes", "registry"]
__version__ = "0.1.0"


def build(recipe, overrides=()) -> LanguageModel:
    """The model a recipe describes: ``build("tiny")``, ``build("my.json")``, ``build(recipe)``."""
    return LanguageModel(recipes.load(recipe, overrides).model)

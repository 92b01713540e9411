"""A training checkpoint as a Hugging Face transformers folder, and back.

    python -m mmrec.recipes.export --hf runs/tiny exported/
    python -m mmrec.recipes.export --hf runs/tiny/step_000100 exported/ --overwrite

The folder holds ``config.json`` (the recipe inside), ``model.safetensors``, the tokenizer
(``tokenizer.json``: the checkpoint's byte-level or BPE tokenizer, the same ids),
``generation_config.json`` and ``modeling_mmrec.py``; ``AutoModelForCausalLM`` loads it
after ``import mmrec.hf``, or with ``trust_remote_code=True`` in a process that has not
imported it (``lm_eval --model hf --model_args pretrained=exported/,trust_remote_code=True``).
Needs ``pip install "mmrec[hf]"``. A recipe that uses a plugin's variant needs the plugin
installed, here and wherever the folder is loaded.

:func:`load_hf` reads such a folder back into a plain ``mmrec.LanguageModel`` (without
transformers). Every problem ends the command with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mmrec
from mmrec.checkpoint import CheckpointError, load_checkpoint
from mmrec.model import LanguageModel
from mmrec.recipes import RecipeError
from mmrec.tokenizer import TokenizerError, load_tokenizer

__all__ = ["export_hf", "load_hf", "main"]

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded save's map of names to files
PREFIX = "model."  # MMRecForCausalLM holds the LanguageModel as .model


class ExportError(ValueError):
    """A folder that cannot be written or read."""


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the checkpoint (or the newest in a run folder) as a transformers folder ``out``.
    A non-empty ``out`` is refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder to export to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty; choose another folder or pass --overwrite to write into it")
    ckpt = load_checkpoint(checkpoint)
    recipe = mmrec.recipes.load(ckpt.recipe)
    tokenizer = load_tokenizer(ckpt.tokenizer, ckpt.path)

    from mmrec.hf import (  # needs transformers: checked after the cheap checks
        MMRecForCausalLM,
        hf_tokenizer,
    )

    model = mmrec.build(recipe)
    ckpt.load_model(model)
    out.mkdir(parents=True, exist_ok=True)
    hf_model, hf_tok = MMRecForCausalLM.from_mmrec(model.eval(), recipe), hf_tokenizer(tokenizer)
    hf_model.generation_config.pad_token_id = hf_tok.pad_token_id  # generate pads finished rows with it
    hf_model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def read_recipe(folder: str | Path) -> dict:
    """The mmrec recipe in a transformers folder's ``config.json``."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {path}: {error}") from None
    if config.get("model_type") != "mmrec" or not isinstance(config.get("recipe"), dict):
        raise ExportError(f"{path} is not the config of an mmrec model (model_type 'mmrec' with a recipe)")
    return config["recipe"]


def load_hf(folder: str | Path) -> tuple[object, LanguageModel]:
    """``(recipe, model)`` from a folder that ``MMRecForCausalLM.save_pretrained`` wrote:
    the recipe in its ``config.json`` and the weights, as a plain ``mmrec.LanguageModel``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    recipe = mmrec.recipes.load(read_recipe(folder))
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = [WEIGHTS]
    weights = {}
    for name in files:
        try:
            weights.update(load_file(str(folder / name)))
        except Exception as error:  # noqa: BLE001 - safetensors and the OS raise various types
            raise ExportError(f"cannot read the weights {folder / name}: {error}") from None
    foreign = sorted(k for k in weights if not k.startswith(PREFIX))
    if foreign:
        raise ExportError(f"{folder} holds weights that are not an mmrec model's: {', '.join(foreign[:5])}")
    model = mmrec.build(recipe)
    missing, unexpected = model.load_state_dict({k[len(PREFIX):]: v for k, v in weights.items()}, strict=False)
    if recipe.model.tie_embeddings:
        missing = [k for k in missing if k != "head.weight"]  # the tied head is stored once, as the embedding
    if missing or unexpected:
        raise ExportError(f"the weights in {folder} do not fit its recipe: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    return recipe, model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmrec.recipes.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", nargs=2, metavar=("CHECKPOINT", "OUT"), required=True,
                   help="a run folder (its newest checkpoint) or a checkpoint folder, and the folder to write")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it is not empty")
    args = p.parse_args(argv)
    try:
        out = export_hf(args.hf[0], args.hf[1], overwrite=args.overwrite)
    except (CheckpointError, RecipeError, TokenizerError, ExportError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.hf[0]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

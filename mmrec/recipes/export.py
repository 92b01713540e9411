"""A training checkpoint as a Hugging Face transformers folder, and back.

    python -m mmrec.recipes.export --hf runs/tiny exported/
    python -m mmrec.recipes.export --hf runs/tiny/step_000100 exported/ --overwrite

The folder holds ``config.json`` (the recipe inside), ``model.safetensors``, the tokenizer
(``tokenizer.json``: the checkpoint's byte-level or BPE tokenizer, the same ids),
``generation_config.json`` and ``modeling_mmrec.py``. A model trained on token shards
(``python -m mmrec.data.prepare``) starts, ends and pads text with their end-of-document
token, ``<|endoftext|>`` (``--eod-token`` names another), and ``generate`` stops at it;
one trained on raw text uses the NUL byte's token (see ``mmrec.hf.hf_tokenizer``).

The folder is written whole or not at all (``mmrec.atomic``): a new folder, an empty one,
or with ``--overwrite`` an earlier export, which it replaces (one holding other files is
refused). ``AutoModelForCausalLM`` loads it
after ``import mmrec.hf``, or with ``trust_remote_code=True`` in a process that has not
imported it (``lm_eval --model hf --model_args pretrained=exported/,trust_remote_code=True``).
Needs ``pip install "mmrec[hf]"``. A recipe that uses a plugin's variant needs the plugin
installed, here and wherever the folder is loaded.

:func:`load_hf` reads such a folder back into a plain ``mmrec.LanguageModel`` (without
transformers). Every problem ends the command with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import mmrec
from mmrec import atomic
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


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False, eod_token: str | None = None) -> Path:
    """Write the checkpoint (or the newest in a run folder) as a transformers folder ``out``,
    whole or not at all. A non-empty ``out`` is refused unless it is an earlier export
    (holding only files that this one writes) and ``overwrite`` is given. ``eod_token``: the shards' end-of-document token, when
    prepare was given another than ``<|endoftext|>``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder to export to")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty; choose another folder, or pass --overwrite to replace "
                              "an earlier export there")
        if not is_export(out):
            raise ExportError(f"{out} is not an mmrec export (no config.json of model_type 'mmrec'); "
                              "--overwrite replaces only an earlier export: choose another folder")
    ckpt = load_checkpoint(checkpoint)
    recipe = mmrec.recipes.load(ckpt.recipe)
    tokenizer = load_tokenizer(ckpt.tokenizer, ckpt.path)

    from mmrec.hf import (  # needs transformers: checked after the cheap checks
        MMRecForCausalLM,
        end_of_document,
        hf_tokenizer,
    )

    model = mmrec.build(recipe)
    ckpt.load_model(model)
    try:
        eod = end_of_document(tokenizer, eod_token)
        hf_tok = hf_tokenizer(tokenizer, eod)
    except ValueError as error:
        raise ExportError(f"cannot export the tokenizer of {ckpt.path}: {error}") from None
    hf_model = MMRecForCausalLM.from_mmrec(model.eval(), recipe)
    hf_model.generation_config.pad_token_id = hf_tok.pad_token_id  # generate pads finished rows with it
    if eod is not None:
        hf_model.generation_config.eos_token_id = hf_tok.eos_token_id  # and stops a row at the end of a document
    made = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(out) as work:
            hf_model.save_pretrained(work)
            hf_tok.save_pretrained(work)
            others = sorted({p.name for p in out.iterdir()} - {p.name for p in work.iterdir()}) if out.is_dir() else []
            if others:
                raise ExportError(f"{out} holds files that an export does not write ({', '.join(others[:5])}); "
                                  "--overwrite replaces an earlier export whole: move them out first")
    except BaseException:
        for folder in made:  # the parents this call made, innermost first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return out


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a transformers folder of an mmrec model."""
    try:
        read_recipe(folder)
    except ExportError:
        return False
    return True


def _missing_parents(path: Path) -> list[Path]:
    """The folders above ``path`` that do not exist yet, innermost first."""
    return [p for p in path.absolute().parents if not p.exists()]


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
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier export")
    p.add_argument("--eod-token", metavar="TOKEN",
                   help="the end-of-document token of a run on token shards prepared with --eod-token "
                        "(default <|endoftext|>, when the tokenizer has it)")
    args = p.parse_args(argv)
    try:
        out = export_hf(args.hf[0], args.hf[1], overwrite=args.overwrite, eod_token=args.eod_token)
    except (CheckpointError, RecipeError, TokenizerError, ExportError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write {args.hf[1]}: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.hf[0]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

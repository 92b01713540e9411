"""What a training run is given, checked before any training: the recipe with its
overrides, the checkpoint it resumes, the data and its tokenizer, the run folder.

The recipe comes from ``--recipe`` (default ``tiny``, or the resumed checkpoint's), then
takes what the data decides: the tokenizer that token shards were made with, or the
vocabulary of a BPE tokenizer trained here. The data is ``--data`` (a text file, a folder
of them, or token shards from ``python -m mmrec.data.prepare``), the resumed run's, or the
built-in corpus. A model that cannot fit the device's memory is refused before any data
is read (:mod:`mmrec.sizing`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mmrec
from mmrec import checkpoint as ckpt_io
from mmrec.checkpoint import Checkpoint, CheckpointError
from mmrec.data import (
    Corpus,
    DataError,
    TokenStream,
    fingerprint,
    load_corpus,
    split_tokens,
)
from mmrec.data.shards import ShardSet, is_shard_folder, open_shards
from mmrec.distributed import World
from mmrec.recipes.checkpointing import check_trainer_state, choose_run_folder
from mmrec.recipes.train_config import TrainError
from mmrec.sizing import check_fits
from mmrec.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = ["Setup", "prepare"]


@dataclass
class Setup:
    """Everything a run needs from the user's input."""

    recipe: Any
    corpus: Corpus | ShardSet  # text, or token shards read by memory map
    tokenizer: Tokenizer
    train_data: TokenStream
    val_tokens: torch.Tensor
    data_print: str  # the data's fingerprint
    out: Path  # the run folder
    resume: Checkpoint | None
    resumed_state: dict | None  # the resumed checkpoint's trainer state
    end_of_document: int | None = None  # the shards' end-of-document id (text corpora have none)


def prepare(args: argparse.Namespace, world: World) -> Setup:
    # with several processes rank 0 alone hashes the files: every rank would read the same
    resume = ckpt_io.load_checkpoint(args.resume, verify=world.is_main) if args.resume else None
    resumed_state = check_trainer_state(resume.trainer_state(), resume) if resume else None
    recipe = mmrec.recipes.load(args.recipe or (resume.recipe if resume else "tiny"), args.overrides)
    train = recipe.train
    check_fits(recipe.model, world.device, world.size)  # before reading any data
    out = choose_run_folder(args.out, recipe.name, resume, args.resume, args.discard_newer)

    data_source = args.data or (resumed_state["data"]["source"] if resume else None)
    try:
        corpus = open_shards(data_source) if is_shard_folder(data_source) else load_corpus(data_source)
    except DataError as e:
        if args.data or data_source is None:
            raise
        raise DataError(f"{e}; it is the data {resume.path} was trained on: pass --data to train on other text") from None

    tokenizer = _tokenizer(corpus, train, resume)
    recipe = _fit_to_tokenizer(recipe, corpus, tokenizer)
    if resume is not None:
        diffs = ckpt_io.model_differences(_comparable_model(resume.recipe), recipe.model.comparable_dump())
        if diffs:
            raise CheckpointError(f"{resume.path} holds a different model than recipe {recipe.name!r}: "
                                  + "; ".join(diffs))
        if resume.step >= train.steps:
            raise TrainError(f"{resume.path} is at step {resume.step} and train.steps is {train.steps}: nothing "
                             f"left to train; raise it to continue, e.g. --resume {args.resume} "
                             f"--set train.steps={resume.step + train.steps}")

    if train.reset_at_documents and not isinstance(corpus, ShardSet):
        raise TrainError("train.reset_at_documents needs token shards, whose documents end in an end-of-document "
                         "token: prepare them with python -m mmrec.data.prepare and pass --data SHARD_FOLDER (a text "
                         "corpus is joined with blank lines and has no document boundaries to reset at)")
    if isinstance(corpus, ShardSet):  # split when prepared; train.val_fraction does not apply
        train_tokens, val_tokens, data_print = corpus.train, corpus.val, corpus.fingerprint
    else:
        tokens = tokenizer.encode_corpus(corpus.documents)
        train_tokens, val_tokens = split_tokens(tokens, train.seq_len, train.val_fraction)
        data_print = fingerprint(tokens)
    if resume is not None and resumed_state["data"]["fingerprint"] != data_print and world.is_main:
        print(f"warning: the data differs from the data {resume.path} was trained on; "
              "the run continues on the new data", file=sys.stderr)
    return Setup(recipe, corpus, tokenizer, TokenStream(train_tokens, train.seq_len, train.seed, "training"),
                 val_tokens, data_print, out, resume, resumed_state,
                 corpus.eod_id if isinstance(corpus, ShardSet) else None)


def _comparable_model(stored_recipe: dict) -> dict:
    """A checkpoint's model section in the form the current recipe's is compared in
    (``comparable_dump``: override groups as the layers they name), or as stored when it
    no longer parses (the text comparison then names what differs)."""
    try:
        return mmrec.recipes.parse(stored_recipe).model.comparable_dump()
    except ValueError:  # mmrec.recipes.RecipeError among them
        return stored_recipe["model"]


def _tokenizer(corpus: Corpus | ShardSet, train, resume: Checkpoint | None) -> Tokenizer:
    """The shards' tokenizer, the resumed checkpoint's, a BPE tokenizer trained on the
    text, or the byte tokenizer."""
    if isinstance(corpus, ShardSet):
        tokenizer = corpus.tokenizer()
        if resume is not None and resume.tokenizer != tokenizer.kind:
            raise TrainError(f"{resume.path} was trained with the {resume.tokenizer} tokenizer, but the shards "
                             f"{corpus.path} hold {tokenizer.kind} tokens")
        return tokenizer
    if resume is not None:
        if resume.tokenizer != train.tokenizer:
            raise TrainError(f"{resume.path} was trained with the {resume.tokenizer} tokenizer, "
                             f"but train.tokenizer is {train.tokenizer!r}")
        return load_tokenizer(resume.tokenizer, resume.path)
    if train.tokenizer == "bpe":
        return train_bpe(corpus.documents, train.bpe_vocab_size)
    return ByteTokenizer()


def _fit_to_tokenizer(recipe, corpus: Corpus | ShardSet, tokenizer: Tokenizer):
    """The recipe with what the tokenizer decides: the shards' tokenizer kind (the
    recipe's vocabulary, perhaps padded, must hold it), or a BPE tokenizer's vocabulary."""
    if isinstance(corpus, ShardSet):
        if recipe.model.vocab_size < tokenizer.vocab_size:
            raise TrainError(f"model.vocab_size is {recipe.model.vocab_size}, but the tokenizer of {corpus.path} has "
                             f"{tokenizer.vocab_size} tokens: raise it (--set model.vocab_size={tokenizer.vocab_size}) "
                             f"or prepare the data with --vocab-size {recipe.model.vocab_size}")
        return mmrec.recipes.load(recipe, [f"train.tokenizer={tokenizer.kind}"])
    if tokenizer.kind == "bpe":
        return mmrec.recipes.load(recipe, [f"model.vocab_size={tokenizer.vocab_size}"])
    if recipe.model.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"model.vocab_size is {recipe.model.vocab_size}, but the byte tokenizer needs 256")
    return recipe

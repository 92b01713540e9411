"""Train a recipe: ``python -m mmrec.recipes.train``.

With no arguments it trains the ``tiny`` recipe on a corpus that ships with Python (the
Python Language Reference from the standard library's ``pydoc_data``), byte-level, and
writes checkpoints under ``runs/tiny``::

    python -m mmrec.recipes.train
    python -m mmrec.recipes.train --recipe small --data my_texts/ --set train.lr=1e-3
    python -m mmrec.recipes.train --resume runs/tiny --set train.steps=400

Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits; a second
Ctrl-C exits at once. The data order is a function of the seed and the step, and the
checkpoint holds every RNG state, so a resumed run continues exactly where it stopped.

The run folder's ``metrics.jsonl`` (:mod:`mmrec.metrics`) is strict JSON, one record a
line, and reads as the run went on: resuming drops the records a stopped run wrote past
its checkpoint.

Resuming a checkpoint older than the newest of its run folder is refused (training on
would overwrite the newer ones): resume the newest, branch off into a new folder with
``--out``, or pass ``--discard-newer``, which deletes them, naming each.

Nothing is saved that is not finite: after every update the weights are checked (one
fused reduction over the parameters), and a step that leaves any weight inf or nan stops
the run (exit status 1) before anything of it is written, like a loss or gradient norm
that stops being finite. Before any work, a model whose weights, gradients and AdamW state
exceed the device's memory is refused (:mod:`mmrec.sizing`).

Several processes (GPUs) run the same command under ``torchrun``::

    torchrun --standalone --nproc-per-node 8 -m mmrec.recipes.train --recipe 1b --data texts/

Each process holds a shard of the model, its gradients and optimizer state (FSDP2, see
``mmrec.distributed``) and takes a contiguous share of every batch: ``train.batch_size``
(divisible by the number of processes) stays the global batch, made of the same samples as
in one process, and the gradients are the averages one process would compute. Rank 0
alone prints, logs and writes the shared files. Checkpoints are distributed checkpoints
(``torch.distributed.checkpoint``, see ``mmrec.checkpoint``) that resume on any number of
processes, one included (``--resume`` as usual); ``generate`` reads them as they are, and

    python -m mmrec.recipes.train --export runs/1b [--out DIR]

writes the newest (or the named) one in the single-file layout (``model.safetensors``,
optimizer state included) under ``DIR`` (default ``<run>/export``). Ctrl-C or SIGTERM
to ``torchrun`` reaches every process, which agree at each step to save and stop;
``torchrun`` kills them after ``--shutdown-timeout`` seconds (default 30), so raise that
when saving takes longer. With dropout each process draws its own masks (rank 0 the
single process's), so only dropout-free runs give the single-process numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import mmrec
from mmrec import checkpoint as ckpt_io
from mmrec import distributed
from mmrec.checkpoint import CheckpointError
from mmrec.data import (
    Corpus,
    DataError,
    TokenStream,
    fingerprint,
    load_corpus,
    sample_prompt,
    split_tokens,
)
from mmrec.data.shards import ShardSet, is_shard_folder, open_shards
from mmrec.generate import generate
from mmrec.optim import build_optimizer, build_scheduler, set_schedule_lr
from mmrec.metrics import MetricsLog, NoLog, WandbRun, continue_metrics, steps_of
from mmrec.recipes import RecipeError
from mmrec.sizing import ModelTooLarge, check_fits
from mmrec.throughput import Throughput, matmul_tflops
from mmrec.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_bpe,
)

EXIT_USAGE, EXIT_DIVERGED, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 130, 143


class TrainError(ValueError):
    """A problem with the run's settings that the user can fix."""


class Diverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmrec.recipes.train",
        description="Train an mmrec recipe (default: tiny, on a corpus shipped with Python).",
    )
    p.add_argument("--recipe", help="a shipped recipe name (tiny, small, ...) or a recipe JSON file; default tiny, or the checkpoint's recipe with --resume")
    p.add_argument("--data", help="a UTF-8 text file or a folder of them, or a folder of token shards (python -m "
                                  "mmrec.data.prepare); default: the built-in corpus (or the checkpoint's data with --resume)")
    p.add_argument("--out", help="run folder for checkpoints and metrics (default runs/<recipe name>)")
    p.add_argument("--resume", metavar="DIR", help="a run folder (its newest checkpoint) or a checkpoint folder to continue from")
    p.add_argument("--discard-newer", action="store_true",
                   help="with --resume of an older checkpoint: delete the run folder's newer checkpoints "
                        "(otherwise refused) and continue from the one named")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.lr=3e-4 --set model.n_layers=2")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard under <out>/tensorboard")
    p.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases under <out>/wandb (WANDB_MODE=offline keeps it on disk)")
    p.add_argument("--peak-tflops", type=float, metavar="TFLOPS",
                   help="the device's bf16 matmul rate, MFU's denominator (default on CUDA: measured at start)")
    p.add_argument("--export", metavar="CHECKPOINT",
                   help="write a distributed (torchrun) checkpoint, or a run folder's newest, as a single-file "
                        "checkpoint under --out (default <run>/export), then exit")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- helpers


def lm_loss(output, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32 softmax) of a forward pass: the model's own when
    it was given the targets (chunked, see ``mmrec.loss``), else from its logits."""
    if output.loss is not None:
        return output.loss
    return F.cross_entropy(output.logits.float().flatten(0, 1), targets.flatten())


def autocast_for(device: torch.device, dtype: str):
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, batches, device, autocast) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        y = y.to(device)
        with autocast():
            output = model(x.to(device), return_state=False, targets=y)
        total += lm_loss(output, y).item()
    model.train(was_training)
    return total / len(batches)


class StopSignal:
    """The first Ctrl-C / SIGTERM asks the loop to save and stop; a second Ctrl-C aborts.

    With several processes, ``agree()`` (a collective, once a step) makes every rank stop
    when any rank was asked to, and ``requested()`` answers what was agreed; in a single
    process ``requested()`` is the live ``signum``."""

    def __init__(self, device: torch.device | None = None):
        self.signum: int | None = None
        self._previous = {}
        self._device = device  # set: agree over the ranks
        self._agreed: int | None = None

    def agree(self) -> None:
        if self._device is not None:
            self._agreed = distributed.any_rank(self.signum or 0, self._device) or None

    def requested(self) -> int | None:
        return self._agreed if self._device is not None else self.signum

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` has a run's files: checkpoints, or metrics of a run that saved none."""
    return bool(ckpt_io.list_checkpoints(folder)) or (folder / "metrics.jsonl").exists()


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: its parent, or ``<run>`` for ``<run>/best/step_N``."""
    parent = checkpoint.parent
    if parent.name == "best" and holds_a_run(parent.parent):
        return parent.parent
    return parent


def newer_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """The checkpoints in ``run_dir`` (and its ``best/``) of steps after ``step``."""
    return [p for folder in (run_dir, run_dir / "best") for s, p in ckpt_io.list_checkpoints(folder) if s > step]


def pick_out_dir(args, recipe, resume) -> Path:
    """The run folder: ``--out``, the resumed run's, or ``runs/<recipe>`` (``-2``, ``-3``, ...
    when taken). A fresh run never writes into a folder that holds another run, and a
    resumed one never over checkpoints newer than the one it resumes (unless
    ``--discard-newer``, which ``train_run`` then carries out)."""
    if args.discard_newer and resume is None:
        raise TrainError("--discard-newer goes with --resume CHECKPOINT (an older checkpoint of a run folder)")
    if args.out:
        out = Path(args.out)
    elif resume is not None:
        out = run_folder_of(resume.path)
    else:
        out = Path("runs") / recipe.name
        n = 1
        while holds_a_run(out):
            n += 1
            out = Path("runs") / f"{recipe.name}-{n}"
    if resume is not None and out.resolve() == run_folder_of(resume.path).resolve():
        newer = [p for s, p in ckpt_io.list_checkpoints(out) if s > resume.step]
        if newer and not args.discard_newer:
            names = ", ".join(p.name for p in newer)
            raise TrainError(
                f"{out} holds checkpoints newer than {resume.path.name} ({names}), which continuing from it "
                f"there would overwrite; resume the newest (--resume {out}), branch off into a new folder "
                f"(--resume {resume.path} --out NEW_FOLDER), or delete them and continue from step {resume.step} "
                f"(--resume {resume.path} --discard-newer)"
            )
        return out
    if args.discard_newer:
        raise TrainError(f"--discard-newer deletes checkpoints of the run folder of --resume {args.resume}, "
                         f"but the run goes to --out {out}: leave out one of the two")
    existing = ckpt_io.list_checkpoints(out)
    if existing:
        raise TrainError(
            f"{out} already holds checkpoints (newest {existing[-1][1].name}); continue that run "
            f"with --resume {out}, or pick another --out"
        )
    if (out / "metrics.jsonl").exists():
        raise TrainError(
            f"{out} holds metrics.jsonl of an earlier run that saved no checkpoint; delete it, or pick another --out"
        )
    return out


# --------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything a run needs from the user's input, checked before any training."""

    recipe: Any
    corpus: Corpus | ShardSet  # text, or token shards read by memory map
    tokenizer: Tokenizer
    train_data: TokenStream
    val_tokens: torch.Tensor
    data_print: str
    out: Path
    resume: ckpt_io.Checkpoint | None
    resumed_state: dict | None


def check_trainer_state(state: Any, resume: ckpt_io.Checkpoint) -> dict:
    """``trainer.pt`` holds what resuming reads (its bytes are checked by the manifest;
    this checks that it is a trainer's state of this step)."""
    where = resume.path / ckpt_io.TRAINER_FILE
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds no trainer state, so {resume.path} cannot be resumed")
    required = ["step", "scheduler", "rng", "data"] + (["optimizer"] if resume.layout == ckpt_io.LAYOUT_SINGLE else [])
    missing = [k for k in required if k not in state]
    if not missing and not (isinstance(state["data"], dict) and {"source", "fingerprint"} <= set(state["data"])):
        missing = ["data.source", "data.fingerprint"]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}, so {resume.path} cannot be resumed "
                              "(its weights still load for generation)")
    if state["step"] != resume.step:
        raise CheckpointError(f"{where} is of step {state['step']}, but {resume.path} is of step {resume.step}: "
                              "the files of two checkpoints are mixed; resume another checkpoint")
    return state


def prepare(args: argparse.Namespace, device: torch.device | None = None) -> Setup:
    # with several processes rank 0 alone hashes the files: every rank would read the same
    resume = ckpt_io.load_checkpoint(args.resume, verify=distributed.is_main()) if args.resume else None
    resumed_state = check_trainer_state(resume.trainer_state(), resume) if resume else None
    source = args.recipe or (resume.recipe if resume else "tiny")
    recipe = mmrec.recipes.load(source, args.overrides)
    train = recipe.train
    if device is not None:  # before reading any data: a model that cannot fit is refused at once
        check_fits(recipe.model, device, distributed.world_size())
    out = pick_out_dir(args, recipe, resume)

    data_source = args.data or (resumed_state["data"]["source"] if resume else None)
    try:
        corpus = open_shards(data_source) if is_shard_folder(data_source) else load_corpus(data_source)
    except DataError as e:
        if args.data or data_source is None:
            raise
        raise DataError(f"{e}; it is the data {resume.path} was trained on: pass --data to train on other text") from None

    if isinstance(corpus, ShardSet):  # the tokenizer the shards were made with
        tokenizer = corpus.tokenizer()
        if resume is not None and resume.tokenizer != tokenizer.kind:
            raise TrainError(f"{resume.path} was trained with the {resume.tokenizer} tokenizer, but the shards "
                             f"{corpus.path} hold {tokenizer.kind} tokens")
    elif resume is not None:
        if resume.tokenizer != train.tokenizer:
            raise TrainError(f"{resume.path} was trained with the {resume.tokenizer} tokenizer, "
                             f"but train.tokenizer is {train.tokenizer!r}")
        tokenizer = load_tokenizer(resume.tokenizer, resume.path)
    elif train.tokenizer == "bpe":
        tokenizer = train_bpe(corpus.documents, train.bpe_vocab_size)
    else:
        tokenizer = ByteTokenizer()
    if isinstance(corpus, ShardSet):  # the recipe's vocabulary (perhaps padded) must hold the shards' tokenizer
        if recipe.model.vocab_size < tokenizer.vocab_size:
            raise TrainError(f"model.vocab_size is {recipe.model.vocab_size}, but the tokenizer of {corpus.path} has "
                             f"{tokenizer.vocab_size} tokens: raise it (--set model.vocab_size={tokenizer.vocab_size}) "
                             f"or prepare the data with --vocab-size {recipe.model.vocab_size}")
        recipe = mmrec.recipes.load(source, [*args.overrides, f"train.tokenizer={tokenizer.kind}"])
    elif tokenizer.kind == "bpe":  # the model's vocabulary is the tokenizer's
        recipe = mmrec.recipes.load(source, [*args.overrides, f"model.vocab_size={tokenizer.vocab_size}"])
    elif recipe.model.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"model.vocab_size is {recipe.model.vocab_size}, but the byte tokenizer needs 256")
    if resume is not None:
        diffs = ckpt_io.model_differences(resume.recipe["model"], recipe.model.model_dump(mode="json"))
        if diffs:
            raise CheckpointError(f"{resume.path} holds a different model than recipe {recipe.name!r}: "
                                  + "; ".join(diffs))

        if resume.step >= train.steps:
            raise TrainError(f"{resume.path} is at step {resume.step} and train.steps is {train.steps}: nothing "
                             f"left to train; raise it to continue, e.g. --resume {args.resume} "
                             f"--set train.steps={resume.step + train.steps}")

    if isinstance(corpus, ShardSet):  # split when prepared; train.val_fraction does not apply
        train_tokens, val_tokens, data_print = corpus.train, corpus.val, corpus.fingerprint
    else:
        tokens = tokenizer.encode_corpus(corpus.documents)
        train_tokens, val_tokens = split_tokens(tokens, train.seq_len, train.val_fraction)
        data_print = fingerprint(tokens)
    if resume is not None and resumed_state["data"]["fingerprint"] != data_print and distributed.is_main():
        print(f"warning: the data differs from the data {resume.path} was trained on; "
              "the run continues on the new data", file=sys.stderr)
    return Setup(recipe, corpus, tokenizer, TokenStream(train_tokens, train.seq_len, train.seed, "training"),
                 val_tokens, data_print, out, resume, resumed_state)


def pick_device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise TrainError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: this PyTorch sees no CUDA device")
    return device


# --------------------------------------------------------------------------- the run


def train_step(forward, model, optimizer, scheduler, data: TokenStream, step: int, train, device, autocast,
               use_aux: bool, rank: int = 0, world: int = 1) -> dict:
    """One optimizer update over ``train.grad_accum`` micro-batches; the batches are those
    of update number ``step`` (counting from 0), whatever ran before. With ``world``
    processes, rank ``rank`` takes its contiguous share of each micro-batch, and the
    returned numbers are those of the whole batch, the same on every rank."""
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    share = train.batch_size // world
    for micro in range(train.grad_accum):
        x, y = data.batch((step * train.grad_accum + micro) * train.batch_size + rank * share, share)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            result = forward(x, return_aux_loss=use_aux, return_state=False, targets=y)
        loss = lm_loss(result, y)
        total = loss + result.aux_loss if use_aux else loss
        (total / train.grad_accum).backward()
        loss_sum += loss.detach()
        if use_aux:
            aux_sum += result.aux_loss.detach().float()
    # The update runs before anything is read back, so that the host waits once a step (for
    # the update too): a step whose loss or gradient turns out not to be finite stops the run
    # all the same, and nothing of it is logged or saved.
    if world > 1:  # FSDP has averaged the gradients over the ranks; the losses are averaged here
        grad_norm = distributed.clip_grad_norm(model.parameters(), train.grad_clip or math.inf)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or math.inf)
    optimizer.step()
    # the update itself can overflow (finite loss and gradients, weights inf or nan)
    weights_bad = ~ckpt_io.weights_finite(model)
    numbers = torch.stack([loss_sum / train.grad_accum, aux_sum / train.grad_accum, weights_bad.float().to(device)])
    if world > 1:  # every rank checked its shards: a mean above 0 means one found a bad weight
        loss_value, aux_value, weights_bad = distributed.mean_over_ranks(numbers.tolist(), device)
    else:
        loss_value, aux_value, weights_bad, grad_norm = torch.cat([numbers, grad_norm.view(1).float()]).tolist()
    lr = optimizer.param_groups[0]["lr"]
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        bad = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {grad_norm}"
        raise Diverged(f"training diverged at step {step + 1}: {bad} (learning rate {lr:.3g})")
    if weights_bad > 0:
        names = ckpt_io.non_finite_parameters(model)
        raise Diverged(f"training diverged at step {step + 1}: the update left weights that are not "
                       f"finite{f' ({ckpt_io.name_some(names)})' if names else ''} (learning rate {lr:.3g})")
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats = {"loss": loss_value, "grad_norm": grad_norm}
    if use_aux:
        stats["aux_loss"] = aux_value
    return stats


def run(args: argparse.Namespace) -> int:
    if args.export:
        return export(args)
    if distributed.env_world_size() > 1:  # started by torchrun
        try:
            device = distributed.init(args.device)
        except RuntimeError as e:
            raise TrainError(str(e)) from None
        try:
            code = train_run(args, device)
            # every rank done before any leaves the group: gloo aborts a process whose
            # group is torn down under it (a failed rank skips this, lest the others wait)
            distributed.barrier()
            return code
        finally:
            distributed.teardown()
    return train_run(args, pick_device(args.device))


def export(args: argparse.Namespace) -> int:
    """``--export``: a distributed checkpoint in the single-file layout."""
    if distributed.env_world_size() > 1:
        raise TrainError("--export runs in one process: start it with python, not torchrun")
    if args.resume or args.recipe or args.data or args.overrides or args.discard_newer:
        raise TrainError("--export converts a checkpoint and takes no other option than --out")
    source = ckpt_io.resolve_checkpoint(args.export)
    path = ckpt_io.export_checkpoint(source, Path(args.out) if args.out else source.parent / "export")
    print(f"exported {source} to {path}")
    return 0


def build_model(recipe) -> mmrec.LanguageModel:
    """The recipe's model on the meta device, to be materialised with ``to_empty`` and
    initialised with ``reset_parameters``; or, where that would leave parameters unset (a
    plugin variant that computes in its constructor, or sets parameters that
    ``reset_parameters`` does not know), built for real on the CPU, its constructor's
    values kept for those parameters."""
    try:
        with torch.device("meta"):
            model = mmrec.build(recipe)
    except (RuntimeError, NotImplementedError):  # e.g. .item() on a meta tensor
        return mmrec.build(recipe)
    if model.parameters_left_to_constructor():
        return mmrec.build(recipe)
    return model


def param_dtype_for(device: torch.device, dtype: str) -> torch.dtype | None:
    """FSDP's compute dtype for the gathered parameters: bf16 where training computes in
    bf16 on CUDA (fp32 master weights stay sharded), otherwise the stored fp32."""
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.bfloat16
    return None


def train_run(args: argparse.Namespace, device: torch.device) -> int:
    sharded, main_rank = distributed.is_distributed(), distributed.is_main()
    rank, world = distributed.rank(), distributed.world_size()
    if args.tensorboard and main_rank:
        try:
            MetricsLog.tensorboard_writer()  # missing tensorboard: say so before any work
        except ImportError as e:
            raise TrainError(str(e)) from None
    if args.wandb and main_rank:
        try:
            WandbRun.module()
        except ImportError as e:
            raise TrainError(str(e)) from None
    setup = prepare(args, device)
    recipe, train, tokenizer, out, resume = setup.recipe, setup.recipe.train, setup.tokenizer, setup.out, setup.resume
    if sharded:
        if train.batch_size % world:
            raise TrainError(f"train.batch_size is {train.batch_size}, which {world} processes cannot share "
                             f"equally: make it a multiple of {world} (--set train.batch_size=N)")
        if len(set(distributed.all_gather_object((setup.data_print, str(out))))) > 1:
            raise TrainError("the processes read different data or chose different run folders; "
                             "give every process the same --data and --out")
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_tmp(out)
        if resume is not None and out.resolve() == run_folder_of(resume.path).resolve():
            newer = newer_checkpoints(out, resume.step)
            if args.discard_newer:  # pick_out_dir refused newer regular checkpoints without it
                for p in newer:
                    shutil.rmtree(p)
                    print(f"--discard-newer: deleted {p}")
            elif newer:  # only best/ can hold one: a run stopped after its best but before its last save
                print(f"note: {', '.join(map(str, newer))} is newer than {resume.path.name}; the first lower "
                      f"validation loss of the resumed run replaces it", file=sys.stderr)
    distributed.barrier()
    autocast = autocast_for(device, train.dtype)
    use_aux = getattr(recipe.model, "planning", None) is not None
    val_batches = TokenStream(setup.val_tokens, train.seq_len, train.seed, "validation").fixed_batches(
        train.eval_batches, train.batch_size)
    if sharded:  # each rank evaluates its share of every batch; the mean is all-reduced
        share = train.batch_size // world
        val_batches = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
                       for x, y in val_batches]

    # The MFU denominator, measured before the model takes the memory.
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = matmul_tflops(device)
        torch.cuda.empty_cache()

    # Model, optimizer, schedule; a checkpoint's states replace the fresh ones. The model
    # is built on the meta device where it can be (no memory), sharded, then given memory
    # and initialised in place: the same initial weights whatever the number of processes.
    random.seed(train.seed)
    torch.manual_seed(train.seed)
    model = build_model(recipe)
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(device)
    n_params = model.num_parameters()
    flops_per_token = model.flops_per_token(train.seq_len)
    if sharded:
        distributed.shard_model(model, device, param_dtype=param_dtype_for(device, train.dtype),
                                compile=train.compile, activation_checkpointing=train.activation_checkpointing)
    else:
        model.set_activation_checkpointing(train.activation_checkpointing)
    if on_meta:
        model.to_empty(device=device)
    model.reset_parameters(seed=train.seed)
    if sharded:
        distributed.seed_rank(train.seed, rank)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    step = 0
    if resume is not None:
        resume.load_training_state(model, optimizer, setup.resumed_state)
        try:
            scheduler.load_state_dict(setup.resumed_state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the optimizer state in {resume.path} does not fit this model: {e}") from None
        step = resume.step
        if distributed.any_rank(int(not bool(ckpt_io.weights_finite(model))), device):
            names = ckpt_io.non_finite_parameters(model)
            older = [p for s, p in ckpt_io.list_checkpoints(resume.path.parent) if s < step]
            raise CheckpointError(f"{resume.path} holds weights that are not finite"
                                  f"{f' ({ckpt_io.name_some(names)})' if names else ''}: it was saved after training "
                                  f"diverged; resume an earlier checkpoint"
                                  + (f" (--resume {older[-1]} --discard-newer)" if older else ""))
        set_schedule_lr(optimizer, scheduler, train, step)
        distributed.set_rng_state(setup.resumed_state, train.seed, step)
    # several processes: each block was compiled before sharding
    forward = torch.compile(model) if train.compile and not sharded else model
    tokens_per_step = train.batch_size * train.seq_len * train.grad_accum

    def save_best(at_step: int) -> Path:
        """The checkpoint of ``at_step`` as ``best/``'s only one (replacing one of a later
        step, left by an attempt that was stopped and is being resumed)."""
        path = save(at_step, out / "best", None)
        if main_rank:
            for _, other in ckpt_io.list_checkpoints(out / "best"):
                if other != path:
                    shutil.rmtree(other, ignore_errors=True)
        return path

    def save(at_step: int, run_dir: Path = out, keep_last: int | None = train.keep_last) -> Path:
        data = {"source": setup.corpus.source and os.path.abspath(setup.corpus.source),
                "fingerprint": setup.data_print, "seed": train.seed,
                "samples_seen": at_step * train.grad_accum * train.batch_size,
                "tokens_seen": at_step * tokens_per_step}
        if sharded:  # the model and optimizer go into a distributed checkpoint
            rng_states = distributed.all_gather_object(ckpt_io.rng_state())
            state = {"step": at_step, "scheduler": scheduler.state_dict(), "rng": rng_states[0],
                     "rng_per_rank": rng_states, "data": data, "best_val_loss": best_val_loss}
            return ckpt_io.save_distributed_checkpoint(run_dir, at_step, model, optimizer, recipe, state, tokenizer,
                                                       keep_last)
        state = {
            "step": at_step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt_io.rng_state(),
            "data": data,
            "best_val_loss": best_val_loss,
        }
        return ckpt_io.save_checkpoint(run_dir, at_step, model, recipe, state, tokenizer, keep_last)

    def validate() -> float:
        loss = evaluate(forward, val_batches, device, autocast)
        if sharded:
            [loss] = distributed.mean_over_ranks([loss], device)
        log.write({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        return loss

    where = f"{world} processes on {device.type} (FSDP)" if sharded else str(device)
    meter = Throughput(tokens_per_step, flops_per_token, peak_tflops, world, device)
    if main_rank:
        if peak_tflops is not None:
            print(f"MFU against {peak_tflops:.4g} TFLOP/s per device "
                  f"({'given' if args.peak_tflops is not None else 'measured bf16 matmul'})")
        print(f"{recipe.name}: {n_params / 1e6:.2f}M parameters on {where}; "
              f"data {setup.corpus.name}: {len(setup.train_data):,} training and {setup.val_tokens.numel():,} "
              f"validation {tokenizer.kind} tokens (vocabulary {tokenizer.vocab_size}); run folder {out}")
        if resume is not None:
            print(f"resuming from {resume.path} at step {step}")

    if main_rank and resume is not None:
        removed = continue_metrics(out / "metrics.jsonl", step)
        if removed:
            print(f"{out / 'metrics.jsonl'}: removed {len(removed)} records{steps_of(removed)}, written after step "
                  f"{step} by the run that stopped (they are trained again now)", file=sys.stderr)
    log = (MetricsLog(out, args.tensorboard, purge_step=step + 1 if resume is not None else None, wandb=args.wandb,
                      config=recipe.model_dump(mode="json")) if main_rank
           else NoLog())
    if resume is not None:
        log.write({"event": "resume", "step": step, "from": str(resume.path)})
    val_loss = None
    # the lowest validation loss so far, carried through resumes (train.save_best keeps its checkpoint)
    best_val_loss = setup.resumed_state.get("best_val_loss") if resume is not None else None
    saved_step = step if resume is not None else None
    try:
        with StopSignal(device if sharded else None) as stop, tqdm(
                total=train.steps, initial=step, unit="step", dynamic_ncols=True, desc=f"train {recipe.name}",
                disable=not main_rank) as bar:
            say = bar.write if main_rank else (lambda text: None)
            model.train()
            stop.agree()
            while step < train.steps and stop.requested() is None:
                lr, started = optimizer.param_groups[0]["lr"], time.perf_counter()
                stats = train_step(forward, model, optimizer, scheduler, setup.train_data, step, train, device,
                                   autocast, use_aux, rank, world)
                step += 1
                stop.agree()
                speed = meter.step(time.perf_counter() - started)
                log.write({"step": step, **{f"train_{k}": v for k, v in stats.items()}, "train_lr": lr,
                           **{f"train_{k}": v for k, v in speed.items()}, "train_tokens": step * tokens_per_step})
                bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{speed['tokens_per_s']:,.0f}", lr=f"{lr:.2e}",
                                **meter.postfix(speed), refresh=False)
                bar.update(1)
                if step % train.eval_every == 0 or step == train.steps:
                    val_loss = validate()
                    say(f"step {step}: validation loss {val_loss:.4f}, "
                        f"perplexity {math.exp(min(val_loss, 50)):.2f}")
                    if best_val_loss is None or val_loss < best_val_loss:
                        best_val_loss = val_loss
                        if train.save_best and train.save:
                            say(f"step {step}: lowest validation loss so far, saved {save_best(step)}")
                if train.save and (step % train.save_every == 0 or step == train.steps or stop.requested() is not None):
                    say(f"step {step}: saved {save(step)}")
                    saved_step = step
            signum = stop.requested()
        summary = meter.summary()
        if summary:
            log.write({"event": "throughput", **summary})
    except Diverged as e:  # every rank sees the same loss and norm, so every rank stops here
        if main_rank:
            last = ckpt_io.list_checkpoints(out)
            kept = (f"the last good checkpoint is {last[-1][1]} (--resume it with a lower --set train.lr=...)"
                    if last else "no checkpoint had been saved yet; lower train.lr (--set train.lr=...)")
            print(f"error: {e}; stopped without saving, {kept}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        last = ckpt_io.list_checkpoints(out)
        kept = f"the last checkpoint is {last[-1][1]}" if last else "no checkpoint was saved"
        print(f"\ninterrupted again: exiting at once without saving; {kept}", file=sys.stderr)
        return EXIT_SIGINT
    finally:
        log.close()

    if signum is not None:
        if main_rank:
            where = (f"checkpoint {ckpt_io.list_checkpoints(out)[-1][1]}" if saved_step
                     else "no checkpoint (train.save is off)" if not train.save
                     else "no checkpoint (no step had finished)")
            command = (f"torchrun --nproc-per-node N -m mmrec.recipes.train --resume {out} (any N, 1 included)"
                       if sharded else f"python -m mmrec.recipes.train --resume {out}")
            print(f"stopped by {signal.Signals(signum).name} at step {step}; {where}. Continue with: {command}",
                  file=sys.stderr)
        return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT

    if main_rank:
        if summary:
            print(meter.describe(summary))
        print(f"validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f} (step {step}, {out})")
    if train.sample_tokens > 0:  # with several processes every rank runs the sharded model; rank 0 prints
        print_sample(model, tokenizer, setup.val_tokens, recipe, autocast, show=main_rank)
    return 0


def print_sample(model, tokenizer: Tokenizer, val_tokens: torch.Tensor, recipe, autocast, show: bool = True) -> None:
    """Continue the opening words of some validation prose."""
    prompt = torch.tensor(tokenizer.encode(sample_prompt(tokenizer.decode(val_tokens[:20_000].tolist()))))
    with autocast():
        ids = generate(model, prompt, recipe.train.sample_tokens, temperature=0.8, top_p=0.95, seed=recipe.train.seed)
    if show:
        print(f"sample (prompt in brackets):\n[{tokenizer.decode(prompt.tolist())}]"
              f"{tokenizer.decode(ids[prompt.numel():].tolist())}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (RecipeError, DataError, CheckpointError, TokenizerError, TrainError, ModelTooLarge) as e:
        head, *rest = str(e).strip().splitlines() or [type(e).__name__]
        rank = os.environ.get("RANK", "0") if distributed.env_world_size() > 1 else "0"
        who = "" if rank == "0" else f"[rank {rank}] "  # every rank says what stopped it
        print(f"{who}error: {head} {'; '.join(r.strip() for r in rest)}".rstrip(), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

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
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import mmrec
from mmrec import checkpoint as ckpt_io
from mmrec import distributed
from mmrec.checkpoint import CheckpointError
from mmrec.data import DataError, TokenStream, sample_prompt
from mmrec.distributed import World
from mmrec.documents import document_starts
from mmrec.generate import generate
from mmrec.metrics import MetricsLog, WandbRun, open_run_log
from mmrec.optim import build_optimizer, build_scheduler
from mmrec.recipes import RecipeError
from mmrec.recipes.checkpointing import Checkpointer
from mmrec.recipes.train_config import TrainError
from mmrec.recipes.train_setup import prepare
from mmrec.sizing import ModelTooLarge
from mmrec.throughput import Throughput, keeping_matmul_precision, matmul_tflops
from mmrec.tokenizer import Tokenizer, TokenizerError

__all__ = ["Diverged", "TrainError", "Trainer", "main"]

EXIT_USAGE, EXIT_DIVERGED, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 130, 143


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
def evaluate(model, batches, device, autocast, end_of_document: int | None = None) -> float:
    """The mean loss over ``batches``; with ``end_of_document``, each layer resets at the
    documents' starts, as training does."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            output = model(x, return_state=False, targets=y, **document_resets(x, end_of_document))
        total += lm_loss(output, y).item()
    model.train(was_training)
    return total / len(batches)


def document_resets(input_ids: torch.Tensor, end_of_document: int | None) -> dict:
    """The forward's ``resets`` keyword for ``input_ids`` (``{}`` without document resets)."""
    return {} if end_of_document is None else {"resets": document_starts(input_ids, end_of_document)}


class StopSignal:
    """The first Ctrl-C / SIGTERM asks the loop to save and stop; a second Ctrl-C aborts.

    ``agree()`` (a collective, which every process calls at the same points of the loop)
    returns the signal when any process was asked to stop, so that all stop together; in
    a world of one it is this process's signal."""

    def __init__(self, world: World):
        self.signum: int | None = None
        self._previous = {}
        self._world = world

    def agree(self) -> int | None:
        return self._world.max(self.signum or 0) or None

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


def initialise(model: mmrec.LanguageModel, world: World, train) -> Callable:
    """Give ``model``, fresh from ``build_model``, memory and its initial weights, set up
    for ``world`` (:meth:`World.parallelize`); returns what the loop calls for the forward
    pass. A model on the meta device is sharded before it gets memory, so that each
    process allocates only its shards, and initialised in place: the same initial weights
    whatever the number of processes. Other processes than rank 0 then get RNG streams of
    their own (dropout)."""
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(world.device)
    forward = world.parallelize(model, param_dtype=param_dtype_for(world.device, train.dtype), compile=train.compile,
                                activation_checkpointing=train.activation_checkpointing)
    if on_meta:
        model.to_empty(device=world.device)
    model.reset_parameters(seed=train.seed)
    world.seed(train.seed)
    return forward


def param_dtype_for(device: torch.device, dtype: str) -> torch.dtype | None:
    """FSDP's compute dtype for the gathered parameters: bf16 where training computes in
    bf16 on CUDA (fp32 master weights stay sharded), otherwise the stored fp32."""
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.bfloat16
    return None


class Trainer:
    """One training run: the loop, and the model, optimizer and schedule it updates; the
    run's inputs (:mod:`mmrec.recipes.train_setup`), its checkpoints
    (:mod:`mmrec.recipes.checkpointing`), its log (:mod:`mmrec.metrics`) and its
    processes (:class:`mmrec.distributed.World`) are components it calls. The same code
    runs in one process and in many."""

    def __init__(self, args: argparse.Namespace, world: World):
        if world.is_main:  # a missing tracker: say so before any work
            try:
                if args.tensorboard:
                    MetricsLog.tensorboard_writer()
                if args.wandb:
                    WandbRun.module()
            except ImportError as e:
                raise TrainError(str(e)) from None
        self.args, self.world, device = args, world, world.device
        setup = self.setup = prepare(args, world)
        recipe, train = setup.recipe, setup.recipe.train
        self.recipe, self.train = recipe, train
        if train.batch_size % world.size:
            raise TrainError(f"train.batch_size is {train.batch_size}, which {world.size} processes cannot share "
                             f"equally: make it a multiple of {world.size} (--set train.batch_size=N)")
        # the model (on the meta device, no memory yet), so that one the run cannot use is refused before the run folder exists
        random.seed(train.seed)
        torch.manual_seed(train.seed)
        model = self.model = build_model(recipe)
        self.end_of_document = setup.end_of_document if train.reset_at_documents else None
        if train.reset_at_documents and not model.supports_resets():
            raise TrainError(f"train.reset_at_documents: recipe {recipe.name!r} has layers that cannot reset at a "
                             f"document start ({model.unsupported_resets()}); use variants that take resets, or "
                             "--set train.reset_at_documents=false")
        if len(set(world.gather((setup.data_print, str(setup.out))))) > 1:
            raise TrainError("the processes read different data or chose different run folders; "
                             "give every process the same --data and --out")
        self.checkpointer = Checkpointer(setup.out, world, recipe, setup.tokenizer,
                                         {"source": setup.corpus.source, "fingerprint": setup.data_print})
        self.checkpointer.open_folder(setup.resume, args.discard_newer)
        self.autocast = autocast_for(device, train.dtype)
        torch.set_float32_matmul_precision("high" if train.tf32 else "highest")
        self.use_aux = getattr(recipe.model, "planning", None) is not None
        share = world.share(train.batch_size)  # each process evaluates its share; the mean is all-reduced
        self.val_batches = [(x[share], y[share]) for x, y in TokenStream(
            setup.val_tokens, train.seq_len, train.seed, "validation").fixed_batches(train.eval_batches, train.batch_size)]

        # The MFU denominator, measured before the model takes the memory.
        self.peak_tflops = args.peak_tflops
        if self.peak_tflops is None and device.type == "cuda":
            self.peak_tflops = matmul_tflops(device)
            torch.cuda.empty_cache()

        # Model, optimizer, schedule; a checkpoint's states replace the fresh ones. Seeded again:
        # the measurement above draws random numbers, and dropout's stream starts here.
        model = self.model
        random.seed(train.seed)
        torch.manual_seed(train.seed)
        self.n_params, flops_per_token = model.num_parameters(), model.flops_per_token(train.seq_len)
        self.forward = initialise(model, world, train)
        self.optimizer = build_optimizer(model, train)
        self.scheduler = build_scheduler(self.optimizer, train)
        self.step = 0
        if setup.resume is not None:
            self.step = self.checkpointer.restore(setup.resume, setup.resumed_state, model, self.optimizer,
                                                  self.scheduler)
        # the lowest validation loss so far, carried through resumes (train.save_best keeps its checkpoint)
        self.best_val_loss = setup.resumed_state.get("best_val_loss") if setup.resume is not None else None
        self.tokens_per_step = train.batch_size * train.seq_len * train.grad_accum
        self.meter = Throughput(self.tokens_per_step, flops_per_token, self.peak_tflops, world)

    def train_step(self) -> dict:
        """One optimizer update over ``train.grad_accum`` micro-batches; the batches are
        those of update number ``self.step`` (counting from 0), whatever ran before. Each
        process takes its contiguous share of each micro-batch; the returned numbers are
        those of the whole batch, the same in every process, but ``data_s``: the seconds
        this process spent reading its batches (the memory map or the token tensor), and
        ``batch_crc``: a CRC-32 of the input tokens it read (hex), by which runs that should
        have seen the same data can be compared."""
        train, device, model, step = self.train, self.world.device, self.model, self.step
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        share = self.world.share(train.batch_size)
        data_s, crc = 0.0, 0
        for micro in range(train.grad_accum):
            reading = time.perf_counter()
            x, y = self.setup.train_data.batch((step * train.grad_accum + micro) * train.batch_size + share.start,
                                               share.stop - share.start)
            data_s += time.perf_counter() - reading
            crc = zlib.crc32(x.contiguous().numpy(), crc)  # the buffer itself, no bytes copy
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with self.autocast():
                result = self.forward(x, return_aux_loss=self.use_aux, return_state=False, targets=y,
                                      **document_resets(x, self.end_of_document))
            loss = lm_loss(result, y)
            total = loss + result.aux_loss if self.use_aux else loss
            (total / train.grad_accum).backward()
            loss_sum += loss.detach()
            if self.use_aux:
                aux_sum += result.aux_loss.detach().float()
        # The update runs before anything is read back, so that the host waits once a step (for
        # the update too): a step whose loss or gradient turns out not to be finite stops the run
        # all the same, and nothing of it is logged or saved. FSDP has averaged the gradients
        # over the processes; the losses are averaged here.
        grad_norm = distributed.clip_grad_norm(model.parameters(), train.grad_clip)
        self.optimizer.step()
        # the update itself can overflow (finite loss and gradients, weights inf or nan); every
        # process checks its shards: a mean above 0 means one found a bad weight
        weights_bad = ~ckpt_io.weights_finite(model)
        numbers = torch.stack([loss_sum / train.grad_accum, aux_sum / train.grad_accum,
                               weights_bad.float().to(device)])
        loss_value, aux_value, weights_bad, grad_norm = torch.cat(
            [self.world.mean(numbers), grad_norm.view(1).double()]).tolist()
        lr = self.optimizer.param_groups[0]["lr"]
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            bad = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {grad_norm}"
            raise Diverged(f"training diverged at step {step + 1}: {bad} (learning rate {lr:.3g})")
        if weights_bad > 0:
            names = ckpt_io.non_finite_parameters(model)
            raise Diverged(f"training diverged at step {step + 1}: the update left weights that are not "
                           f"finite{f' ({ckpt_io.name_some(names)})' if names else ''} (learning rate {lr:.3g})")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats = {"loss": loss_value, "grad_norm": grad_norm, "data_s": data_s, "batch_crc": f"{crc:08x}"}
        if self.use_aux:
            stats["aux_loss"] = aux_value
        return stats

    def validate(self, say: Callable[[str], None]) -> float:
        """The validation loss, logged and said; a new lowest one is kept in ``best/``
        (``train.save_best``)."""
        [loss] = self.world.mean_floats([evaluate(self.forward, self.val_batches, self.world.device, self.autocast,
                                                        self.end_of_document)])
        step = self.step
        self.log.write({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        say(f"step {step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.2f}")
        if self.best_val_loss is None or loss < self.best_val_loss:
            self.best_val_loss = loss
            best = self.checkpointer.save_best(step, self.model, self.optimizer, self.scheduler, loss)
            if best is not None:
                say(f"step {step}: lowest validation loss so far, saved {best}")
        return loss

    def fit(self) -> int:
        """Train to ``train.steps``; the exit status."""
        world, train, setup = self.world, self.train, self.setup
        main_rank, resume = world.is_main, setup.resume
        if main_rank:
            self.announce()
        self.log = open_run_log(setup.out, main_rank, self.args.tensorboard, self.args.wandb,
                                resume_step=self.step if resume is not None else None,
                                config=self.recipe.model_dump(mode="json"))
        if resume is not None:
            self.log.write({"event": "resume", "step": self.step, "from": str(resume.path)})
        val_loss = None
        try:
            with StopSignal(world) as stop, tqdm(
                    total=train.steps, initial=self.step, unit="step", dynamic_ncols=True,
                    desc=f"train {self.recipe.name}", disable=not main_rank) as bar:
                say = bar.write if main_rank else (lambda text: None)
                self.model.train()
                # the processes agree on a stop once a step, after it: the same answer then
                # decides the save (a stop saves the step it ends) and the loop
                signum = stop.agree()
                while self.step < train.steps and signum is None:
                    lr, started = self.optimizer.param_groups[0]["lr"], time.perf_counter()
                    stats = self.train_step()
                    self.log_step(stats, lr, time.perf_counter() - started, bar)
                    if self.step % train.eval_every == 0 or self.step == train.steps:
                        val_loss = self.validate(say)
                    signum = stop.agree()
                    if self.checkpointer.due(self.step, stopping=signum is not None):
                        path = self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler,
                                                      self.best_val_loss)
                        say(f"step {self.step}: saved {path}")
            summary = self.meter.summary()
            if summary:
                self.log.write({"event": "throughput", **summary})
        except Diverged as e:  # every process sees the same loss and norm, so every one stops here
            if main_rank:
                last = self.checkpointer.last()
                kept = (f"the last good checkpoint is {last} (--resume it with a lower --set train.lr=...)"
                        if last else "no checkpoint had been saved yet; lower train.lr (--set train.lr=...)")
                print(f"error: {e}; stopped without saving, {kept}", file=sys.stderr)
            return EXIT_DIVERGED
        except KeyboardInterrupt:
            last = self.checkpointer.last()
            kept = f"the last checkpoint is {last}" if last else "no checkpoint was saved"
            print(f"\ninterrupted again: exiting at once without saving; {kept}", file=sys.stderr)
            # raised, not returned: this process alone is leaving, so it must not wait at the
            # closing barrier for the others (they may be inside a collective)
            raise SystemExit(EXIT_SIGINT) from None
        finally:
            self.log.close()

        if signum is not None:
            if main_rank:
                self.report_stop(signum)
            return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT
        if main_rank:
            if summary:
                print(self.meter.describe(summary))
            print(f"validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f} "
                  f"(step {self.step}, {setup.out})")
        if train.sample_tokens > 0:  # with several processes every one runs the sharded model; rank 0 prints
            print_sample(self.model, setup.tokenizer, setup.val_tokens, self.recipe, self.autocast, show=main_rank)
        return 0

    def log_step(self, stats: dict, lr: float, seconds: float, bar: tqdm) -> None:
        speed = self.meter.step(seconds)
        self.log.write({"step": self.step, **{f"train_{k}": v for k, v in stats.items()}, "train_lr": lr,
                        **{f"train_{k}": v for k, v in speed.items()}, "train_tokens": self.step * self.tokens_per_step})
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{speed['tokens_per_s']:,.0f}", lr=f"{lr:.2e}",
                        **self.meter.postfix(speed), refresh=False)
        bar.update(1)

    def announce(self) -> None:
        setup, tokenizer = self.setup, self.setup.tokenizer
        if self.peak_tflops is not None:
            print(f"MFU against {self.peak_tflops:.4g} TFLOP/s per device "
                  f"({'given' if self.args.peak_tflops is not None else 'measured bf16 matmul'})")
        print(f"{self.recipe.name}: {self.n_params / 1e6:.2f}M parameters on {self.world.describe()}; "
              f"data {setup.corpus.name}: {len(setup.train_data):,} training and {setup.val_tokens.numel():,} "
              f"validation {tokenizer.kind} tokens (vocabulary {tokenizer.vocab_size}); run folder {setup.out}")
        if setup.resume is not None:
            print(f"resuming from {setup.resume.path} at step {self.step}")

    def report_stop(self, signum: int) -> None:
        out, last, resume = self.setup.out, self.checkpointer.last(), self.setup.resume
        stopped = f"stopped by {signal.Signals(signum).name} at step {self.step}"
        if last is None:  # stopped before the first step, or with train.save off
            reason = "train.save is off" if not self.train.save else "no step had finished"
            again = f"--resume {resume.path} --out {out}" if resume is not None else f"--out {out}"
            print(f"{stopped}; no checkpoint in {out} ({reason}). Start again with {again} "
                  f"after deleting {out / 'metrics.jsonl'}", file=sys.stderr)
            return
        command = (f"torchrun --nproc-per-node N -m mmrec.recipes.train --resume {out} (any N, 1 included)"
                   if self.world.sharded else f"python -m mmrec.recipes.train --resume {out}")
        print(f"{stopped}; checkpoint {last}. Continue with: {command}", file=sys.stderr)


def print_sample(model, tokenizer: Tokenizer, val_tokens: torch.Tensor, recipe, autocast, show: bool = True) -> None:
    """Continue the opening words of some validation prose."""
    prompt = torch.tensor(tokenizer.encode(sample_prompt(tokenizer.decode(val_tokens[:20_000].tolist()))))
    # eager: compiled blocks would compile again for each shape a token-by-token decode takes
    with autocast(), torch.compiler.set_stance("force_eager"):
        ids = generate(model, prompt, recipe.train.sample_tokens, temperature=0.8, top_p=0.95, seed=recipe.train.seed)
    if show:
        print(f"sample (prompt in brackets):\n[{tokenizer.decode(prompt.tolist())}]"
              f"{tokenizer.decode(ids[prompt.numel():].tolist())}")


def run(args: argparse.Namespace) -> int:
    if args.export:
        return export(args)
    try:
        world = distributed.join(args.device)  # torchrun's processes, or a world of one
    except RuntimeError as e:
        raise TrainError(str(e)) from None
    try:
        with keeping_matmul_precision():  # the trainer sets it for the run (train.tf32)
            code = Trainer(args, world).fit()
        # every process done before any leaves the group: gloo aborts a process whose
        # group is torn down under it (a failed process skips this, lest the others wait)
        world.barrier()
        return code
    finally:
        world.leave()


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

"""A training run's folder and its checkpoints: where they go, when they are saved, and
resuming from one.

The run folder holds ``step_NNNNNN/`` checkpoints (the newest ``train.keep_last``), at
most one more in ``best/`` (``train.save_best``: the lowest validation loss so far), and
``metrics.jsonl``. A fresh run never writes into a folder that holds another run, and a
resumed one never over checkpoints newer than the one it resumes: training on would
overwrite them, so it is refused unless ``--discard-newer``, which deletes them, naming
each. The file layouts are :mod:`mmrec.checkpoint`'s.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from mmrec import checkpoint as ckpt_io
from mmrec.checkpoint import Checkpoint, CheckpointError
from mmrec.distributed import World
from mmrec.optim import set_schedule_lr
from mmrec.recipes.train_config import TrainError

__all__ = ["Checkpointer", "check_trainer_state", "choose_run_folder", "holds_a_run", "newer_checkpoints",
           "run_folder_of"]

BEST_DIR = "best"


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` has a run's files: checkpoints, or metrics of a run that saved none."""
    return bool(ckpt_io.list_checkpoints(folder)) or (folder / "metrics.jsonl").exists()


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: its parent, or ``<run>`` for ``<run>/best/step_N``."""
    parent = checkpoint.parent
    if parent.name == BEST_DIR and holds_a_run(parent.parent):
        return parent.parent
    return parent


def newer_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """The checkpoints in ``run_dir`` and its ``best/`` of steps after ``step``."""
    return [p for folder in (run_dir, run_dir / BEST_DIR) for s, p in ckpt_io.list_checkpoints(folder) if s > step]


def choose_run_folder(out: str | None, recipe_name: str, resume: Checkpoint | None, resume_arg: str | None,
                      discard_newer: bool) -> Path:
    """The run folder: ``out`` (``--out``), the resumed run's, or ``runs/<recipe>``
    (``-2``, ``-3``, ... when taken), checked as the module docstring says
    (:meth:`Checkpointer.open_folder` deletes what ``discard_newer`` allows)."""
    if discard_newer and resume is None:
        raise TrainError("--discard-newer goes with --resume CHECKPOINT (an older checkpoint of a run folder)")
    if out:
        folder = Path(out)
    elif resume is not None:
        folder = run_folder_of(resume.path)
    else:
        folder, n = Path("runs") / recipe_name, 1
        while holds_a_run(folder):
            n += 1
            folder = Path("runs") / f"{recipe_name}-{n}"
    if resume is not None and folder.resolve() == run_folder_of(resume.path).resolve():
        # a newer best/ checkpoint is no refusal: the resumed run's first new best replaces it
        newer = [p for p in newer_checkpoints(folder, resume.step) if p.parent == folder]
        if newer and not discard_newer:
            names = ", ".join(p.name for p in newer)
            raise TrainError(
                f"{folder} holds checkpoints newer than {resume.path.name} ({names}), which continuing from it "
                f"there would overwrite; resume the newest (--resume {folder}), branch off into a new folder "
                f"(--resume {resume.path} --out NEW_FOLDER), or delete them and continue from step {resume.step} "
                f"(--resume {resume.path} --discard-newer)"
            )
        return folder
    if discard_newer:
        raise TrainError(f"--discard-newer deletes checkpoints of the run folder of --resume {resume_arg}, "
                         f"but the run goes to --out {folder}: leave out one of the two")
    existing = ckpt_io.list_checkpoints(folder)
    if existing:
        raise TrainError(
            f"{folder} already holds checkpoints (newest {existing[-1][1].name}); continue that run "
            f"with --resume {folder}, or pick another --out"
        )
    if (folder / "metrics.jsonl").exists():
        raise TrainError(
            f"{folder} holds metrics.jsonl of an earlier run that saved no checkpoint; delete it, or pick another --out"
        )
    return folder


def check_trainer_state(state: Any, resume: Checkpoint) -> dict:
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


class Checkpointer:
    """Saves a run's checkpoints into its folder ``out`` (every ``train.save_every`` steps,
    at the last step, when stopped, and the best) and restores one into a fresh model,
    optimizer and scheduler. Every process calls every method (saving a sharded model is
    a collective); rank 0 alone changes the folder otherwise."""

    def __init__(self, out: Path, world: World, recipe, tokenizer, data: dict[str, Any]):
        self.out, self.world, self.recipe, self.tokenizer = out, world, recipe, tokenizer
        self.train = recipe.train
        self.data = data  # the data's "source" and "fingerprint", recorded in every checkpoint

    def open_folder(self, resume: Checkpoint | None, discard_newer: bool) -> None:
        """Create the folder, delete what an interrupted save left, and the checkpoints
        newer than ``resume`` with ``discard_newer`` (:func:`choose_run_folder` refused
        them without it)."""
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_stale_tmp(self.out)
            if resume is not None and self.out.resolve() == run_folder_of(resume.path).resolve():
                newer = newer_checkpoints(self.out, resume.step)
                if discard_newer:
                    for p in newer:
                        shutil.rmtree(p)
                        print(f"--discard-newer: deleted {p}")
                elif newer:  # only best/ can hold one: a run stopped after its best but before its last save
                    print(f"note: {', '.join(map(str, newer))} is newer than {resume.path.name}; the first lower "
                          f"validation loss of the resumed run replaces it", file=sys.stderr)
        self.world.barrier()

    def restore(self, resume: Checkpoint, state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler) -> int:
        """Load ``resume`` (its trainer ``state`` already checked) into the fresh ``model``,
        ``optimizer`` and ``scheduler``, with the current recipe's learning rate and every
        RNG where it was; returns its step."""
        resume.load_training_state(model, optimizer, state)
        try:
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the scheduler state in {resume.path} does not fit this run: {e}") from None
        step = resume.step
        if self.world.max(int(not bool(ckpt_io.weights_finite(model)))):
            names = ckpt_io.non_finite_parameters(model)
            older = [p for s, p in ckpt_io.list_checkpoints(resume.path.parent) if s < step]
            raise CheckpointError(f"{resume.path} holds weights that are not finite"
                                  f"{f' ({ckpt_io.name_some(names)})' if names else ''}: it was saved after training "
                                  f"diverged; resume an earlier checkpoint"
                                  + (f" (--resume {older[-1]} --discard-newer)" if older else ""))
        set_schedule_lr(optimizer, scheduler, self.train, step)
        self.world.restore_rng(state, self.train.seed, step)
        return step

    def due(self, step: int, stopping: bool) -> bool:
        """Whether ``step`` is saved: every ``train.save_every``, the last, and when stopping."""
        return self.train.save and (step % self.train.save_every == 0 or step == self.train.steps or stopping)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             best_val_loss: float | None, folder: Path | None = None) -> Path:
        """The checkpoint of ``step`` in the run folder (or ``folder``), pruned to
        ``train.keep_last`` there."""
        train = self.train
        tokens_per_step = train.batch_size * train.seq_len * train.grad_accum
        data = {"source": self.data["source"] and os.path.abspath(self.data["source"]),
                "fingerprint": self.data["fingerprint"], "seed": train.seed,
                "samples_seen": step * train.grad_accum * train.batch_size, "tokens_seen": step * tokens_per_step}
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": ckpt_io.rng_state(), "data": data,
                 "best_val_loss": best_val_loss}
        keep_last = train.keep_last if folder is None else None
        return ckpt_io.save_training_checkpoint(folder or self.out, step, model, optimizer, self.recipe, state,
                                                self.tokenizer, keep_last)

    def save_best(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                  best_val_loss: float) -> Path | None:
        """With ``train.save_best``: the checkpoint of ``step`` as ``best/``'s only one
        (replacing one of a later step, left by an attempt that was stopped and is being
        resumed)."""
        if not (self.train.save_best and self.train.save):
            return None
        path = self.save(step, model, optimizer, scheduler, best_val_loss, self.out / BEST_DIR)
        if self.world.is_main:
            for _, other in ckpt_io.list_checkpoints(self.out / BEST_DIR):
                if other != path:
                    shutil.rmtree(other, ignore_errors=True)
        return path

    def last(self) -> Path | None:
        """The newest checkpoint of the run folder."""
        ckpts = ckpt_io.list_checkpoints(self.out)
        return ckpts[-1][1] if ckpts else None

"""``metrics.jsonl``: a training run's log, one JSON object a line, plus TensorBoard and
Weights & Biases.

Records: ``{"step": N, "train_loss": ..., ...}`` after each update, ``{"step": N,
"val_loss": ...}`` after each evaluation, and events (``{"event": "resume", "step": N,
"from": ...}``, ``{"event": "throughput", ...}``). It is strict JSON: a number that is not
finite is written as ``null``. It tells the run as it went on: resuming from step N first
removes the records of steps after N that a stopped or killed run wrote past its last
checkpoint (:func:`continue_metrics`), and TensorBoard's events of those steps are hidden
likewise (``purge_step``). Each record's numbers go to TensorBoard and wandb under the
same names (``train_loss`` as ``train/loss``). wandb keeps a run's steps increasing, so
each invocation (a resume included) is a wandb run of its own, grouped by the run folder.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from mmrec import atomic


class NoLog:
    """What ranks other than 0 log: nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def finite_or_null(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by ``None`` (JSON ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _step_of(record: Any) -> float | None:
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def _cut_after(kept: list[tuple[str, Any]], step: int) -> list[tuple[str, Any]]:
    """Remove from ``kept`` (in place) the first record of a step after ``step`` and
    everything after it; return what was removed."""
    for i, (_, record) in enumerate(kept):
        s = _step_of(record)
        if s is not None and s > step:
            removed = kept[i:]
            del kept[i:]
            return removed
    return []


def continue_metrics(path: Path, step: int) -> list[str]:
    """Make ``metrics.jsonl`` tell the run as it continues from ``step``: remove the records
    of later steps (and the events after them) that a run stopped after its checkpoint at
    ``step`` wrote, and, in a log from before this rule, the records each earlier
    ``resume`` event superseded; also a last line cut short by a kill. The file is
    rewritten atomically when anything changes. Returns the removed lines."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    kept: list[tuple[str, Any]] = []
    removed: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):  # a write cut short by a kill
                removed.append(line)
                continue
            record = None  # not ours to judge: kept as it is
        if isinstance(record, dict) and record.get("event") == "resume" and _step_of(record) is not None:
            removed += [line for line, _ in _cut_after(kept, record["step"])]
        kept.append((line, record))
    removed += [line for line, _ in _cut_after(kept, step)]
    if removed or (text and not text.endswith("\n")):
        with atomic.replacing(path, path.with_name(path.name + ".tmp")) as tmp:
            tmp.write_text("".join(line + "\n" for line, _ in kept), encoding="utf-8")
    return removed


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a record as the trackers name them: ``train_loss`` -> ``train/loss``."""
    return {key.replace("_", "/", 1): value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float))}


class WandbRun:
    """A Weights & Biases run in ``<out>/wandb`` (``WANDB_MODE=offline`` keeps it on disk;
    ``WANDB_PROJECT`` names the project, default ``mmrec``), named after the run folder, or
    ``<folder>-from-<step>`` when resuming, in a group named after the run folder."""

    def __init__(self, out: Path, config: dict | None, resume_step: int | None):
        wandb = self.module()
        folder = out.resolve().name
        name = folder + (f"-from-{resume_step}" if resume_step is not None else "")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mmrec"), dir=str(out), name=name,
                              group=folder, config=config or {})

    @staticmethod
    def module():
        try:
            import wandb
        except ImportError:
            raise ImportError('--wandb needs the wandb package: pip install wandb (or "mmrec[wandb]")') from None
        return wandb

    def write(self, step: int, numbers: dict[str, float]) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """``metrics.jsonl`` in the run folder (strict JSON: non-finite numbers are ``null``),
    plus TensorBoard and wandb when asked. ``purge_step``: on resume, the first step trained
    again, whose TensorBoard events and later ones of an earlier attempt are hidden.
    ``config``: what the wandb run records as its configuration (the recipe)."""

    def __init__(self, out: Path, tensorboard: bool, purge_step: int | None = None, wandb: bool = False,
                 config: dict | None = None):
        self.tb = (self.tensorboard_writer()(str(out / "tensorboard"), purge_step=purge_step)
                   if tensorboard else None)
        resume_step = None if purge_step is None else purge_step - 1
        self.wandb = WandbRun(out, config, resume_step) if wandb else None
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    @staticmethod
    def tensorboard_writer():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
        self.file.flush()
        if "step" not in record:
            return
        numbers = scalars(record)
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None and numbers:
            self.wandb.write(record["step"], numbers)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def open_run_log(out: Path, main: bool, tensorboard: bool, wandb: bool, resume_step: int | None,
                 config: dict | None) -> MetricsLog | NoLog:
    """The log of the run in ``out``: :class:`MetricsLog` in the main process (rank 0), which
    alone writes it, :class:`NoLog` in the others. Resuming from ``resume_step`` first
    removes what the stopped run logged past it (:func:`continue_metrics`), saying so."""
    if not main:
        return NoLog()
    if resume_step is not None:
        removed = continue_metrics(out / "metrics.jsonl", resume_step)
        if removed:
            print(f"{out / 'metrics.jsonl'}: removed {len(removed)} records{steps_of(removed)}, written after step "
                  f"{resume_step} by the run that stopped (they are trained again now)", file=sys.stderr)
    return MetricsLog(out, tensorboard, purge_step=None if resume_step is None else resume_step + 1, wandb=wandb,
                      config=config)


def steps_of(lines: list[str]) -> str:
    """`` of step N`` / `` of steps N-M``: the steps of the removed record ``lines``, for a message."""
    steps = [int(s) for s in (_step_of(_json_or_none(line)) for line in lines) if s is not None]
    if not steps:
        return ""
    return f" of step {steps[0]}" if min(steps) == max(steps) else f" of steps {min(steps)}-{max(steps)}"


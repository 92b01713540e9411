"""``metrics.jsonl``: a training run's log, one JSON object a line, plus TensorBoard.

Records: ``{"step": N, "train_loss": ..., ...}`` after each update, ``{"step": N,
"val_loss": ...}`` after each evaluation, and events (``{"event": "resume", "step": N,
"from": ...}``, ``{"event": "throughput", ...}``). It is strict JSON: a number that is not
finite is written as ``null``. It tells the run as it went on: resuming from step N first
removes the records of steps after N that a stopped or killed run wrote past its last
checkpoint (:func:`continue_metrics`), and TensorBoard's events of those steps are hidden
likewise (``purge_step``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


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
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line, _ in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return removed


class MetricsLog:
    """``metrics.jsonl`` in the run folder (strict JSON: non-finite numbers are ``null``),
    plus TensorBoard when asked. ``purge_step``: on resume, the first step trained again,
    whose TensorBoard events and later ones of an earlier attempt are hidden."""

    def __init__(self, out: Path, tensorboard: bool, purge_step: int | None = None):
        self.tb = (self.tensorboard_writer()(str(out / "tensorboard"), purge_step=purge_step)
                   if tensorboard else None)
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
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace("_", "/", 1), value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def steps_of(lines: list[str]) -> str:
    """`` of step N`` / `` of steps N-M``: the steps of the removed record ``lines``, for a message."""
    steps = [int(s) for s in (_step_of(_json_or_none(line)) for line in lines) if s is not None]
    if not steps:
        return ""
    return f" of step {steps[0]}" if min(steps) == max(steps) else f" of steps {min(steps)}-{max(steps)}"


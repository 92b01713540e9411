"""Language-model quality at a fixed budget: MM-Rec against the Transformer of its size.

Both recipes train with ``python -m mmrec.recipes.train`` on the same data with the same
``train`` settings (the shipped ``shakespeare-char`` pair matches nanoGPT's
shakespeare-char baseline: about 10.7M parameters, characters, context 256, batch 64,
5000 steps, validation on the last 10%). After training, each final checkpoint is
scored on the whole validation split (every non-overlapping window, float32), so the
comparison does not depend on the few batches the training loop samples. With
``train.save_best`` (on in the shipped pair) the checkpoint of the lowest validation loss
seen during training is scored the same way: that is the figure nanoGPT reports (it keeps
a checkpoint only when validation improves), while the final one shows any overfitting.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import mmrec
from mmrec.bench.common import run_metadata, write_json
from mmrec.checkpoint import Checkpoint, load_checkpoint
from mmrec.data import load_corpus, split_tokens
from mmrec.tokenizer import load_tokenizer


def add_subcommand(commands) -> None:
    parser = commands.add_parser("quality", help="validation loss of MM-Rec vs a Transformer at one budget", description=__doc__)
    parser.add_argument("--data", required=True, help="text file or folder (e.g. tinyshakespeare.txt)")
    parser.add_argument("--recipes", nargs="+", default=["shakespeare-char", "transformer-shakespeare-char"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override applied to every recipe, e.g. --set train.steps=2000")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"), help="folder for the training runs")
    parser.add_argument("--sequential", action="store_true", help="train one recipe after the other instead of side by side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.set_defaults(run=run)


def train_command(recipe: str, data: str, run_dir: Path, device: str, overrides: list[str]) -> list[str]:
    """``python -m mmrec.recipes.train`` for ``recipe`` into ``run_dir``, in this interpreter."""
    return [sys.executable, "-m", "mmrec.recipes.train", "--recipe", recipe, "--data", data, "--out", str(run_dir),
            "--device", device, *[x for o in overrides for x in ("--set", o)]]


def train_all(commands: dict[str, tuple[list[str], Path]], sequential: bool) -> Iterator[tuple[str, int, float]]:
    """Run each training command (``key -> (argv, log file)``) side by side, or one after the
    other, and yield ``(key, exit code, wall seconds)`` as each finishes, whatever their
    order: a caller that scores each run as it comes keeps every finished one when a time
    limit stops the rest. One after the other, each is yielded before the next starts. A
    caller that stops early (an error while scoring) stops the runs still going: SIGTERM,
    on which training saves a checkpoint and exits."""
    pending = {}

    def finish(key: str) -> tuple[str, int, float]:
        process, started, log = pending.pop(key)
        process.wait()
        log.close()
        return key, process.returncode, time.perf_counter() - started

    try:
        for key, (cmd, log_file) in commands.items():
            log = open(log_file, "w")  # noqa: SIM115 - closed when the process is done
            pending[key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(), log)
            if sequential:
                yield finish(key)
        while pending:
            finished = [key for key, (process, *_) in pending.items() if process.poll() is not None]
            if not finished:
                time.sleep(1.0)
            for key in finished:
                yield finish(key)
    finally:
        for process, _, log in pending.values():
            process.terminate()
            process.wait()
            log.close()


def load_trained(run_dir: Path, device: str) -> tuple[Checkpoint, mmrec.LanguageModel]:
    """The newest checkpoint of ``run_dir`` (or the checkpoint folder itself) and its model,
    float32, in eval mode on ``device``: what the benchmarks score."""
    checkpoint = load_checkpoint(run_dir, verify=False)
    model = mmrec.build(str(checkpoint.recipe_file))
    checkpoint.load_model(model)
    return checkpoint, model.to(device).float().eval()


@torch.no_grad()
def full_validation_loss(run_dir: Path, data: str, device: str) -> dict:
    checkpoint, model = load_trained(run_dir, device)
    train = mmrec.recipes.load(str(checkpoint.recipe_file)).train
    tokenizer = load_tokenizer(checkpoint.tokenizer, checkpoint.path)
    tokens = tokenizer.encode_corpus(load_corpus(data).documents)
    _, val = split_tokens(tokens, train.seq_len, train.val_fraction)
    n = (val.numel() - 1) // train.seq_len
    windows = val[: n * train.seq_len + 1].long()
    inputs = windows[:-1].view(n, train.seq_len)
    targets = windows[1:].view(n, train.seq_len)
    total = 0.0
    for start in range(0, n, 64):
        logits = model(inputs[start : start + 64].to(device), return_state=False).logits
        total += F.cross_entropy(logits.flatten(0, 1), targets[start : start + 64].flatten().to(device), reduction="sum").item()
    loss = total / (n * train.seq_len)
    return {"step": checkpoint.step, "parameters": model.num_parameters(), "val_tokens": n * train.seq_len,
            "full_val_loss": loss, "full_val_ppl": math.exp(loss)}


def read_records(run_dir: Path) -> list[dict]:
    """A run's ``metrics.jsonl`` (:mod:`mmrec.metrics`), one dict a record."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> dict:
    records = read_records(run_dir)
    val = [r for r in records if r.get("val_loss") is not None]  # null: a loss that was not finite
    speeds = [r["train_tokens_per_s"] for r in records if "train_tokens_per_s" in r]
    speeds = speeds[len(speeds) // 10 :]  # past the compile and warm-up steps
    return {"last_val_loss": val[-1]["val_loss"] if val else None, "best_val_loss": min((r["val_loss"] for r in val), default=None),
            "median_tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None}


def run(args: argparse.Namespace) -> int:
    meta = {**run_metadata(), "data": args.data, "overrides": args.overrides, "side_by_side": not args.sequential}
    args.runs.mkdir(parents=True, exist_ok=True)
    commands = {recipe: (train_command(recipe, args.data, args.runs / Path(recipe).stem, args.device, args.overrides),
                         args.runs / f"{Path(recipe).stem}.log")  # a shipped name, or a recipe file
                for recipe in args.recipes}
    # Scored as each finishes, and the JSON rewritten after each: a run stopped early (a
    # time limit) keeps every recipe that had finished, whatever their order.
    rows = []
    for recipe, exit_code, wall_s in train_all(commands, args.sequential):
        run_dir = args.runs / Path(recipe).stem
        row = {"recipe": recipe, "exit_code": exit_code, "wall_s": wall_s}
        if exit_code == 0:
            row.update(read_metrics(run_dir))
            row.update(full_validation_loss(run_dir, args.data, args.device))
            if (run_dir / "best").is_dir():
                best = full_validation_loss(run_dir / "best", args.data, args.device)
                row.update(best_step=best["step"], best_full_val_loss=best["full_val_loss"])
        else:
            print(f"{recipe}: training failed (exit {exit_code}); see {run_dir}.log", file=sys.stderr)
        rows.append(row)
        print(row, flush=True)
        if len(rows) < len(commands):
            write_json(args.out, {**meta, "complete": False, "results": rows})
    print(f"\n{meta['device']}; data {args.data}; overrides {args.overrides or 'none'}")
    print(f"{'recipe':<30} {'params':>10} {'steps':>6} {'full val loss':>14} {'train-loop val':>15} "
          f"{'best step':>10} {'best full val':>14} {'tokens/s':>10}")
    for r in rows:
        if r["exit_code"] != 0:
            print(f"{r['recipe']:<30} failed")
            continue
        best = (f"{r['best_step']:>10} {r['best_full_val_loss']:>14.4f}" if "best_step" in r else f"{'-':>10} {'-':>14}")
        print(f"{r['recipe']:<30} {r['parameters']:>10,} {r['step']:>6} {r['full_val_loss']:>14.4f} "
              f"{r['last_val_loss']:>15.4f} {best} {r['median_tokens_per_s'] or 0:>10.0f}")
    write_json(args.out, {**meta, "complete": True, "results": rows})
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1

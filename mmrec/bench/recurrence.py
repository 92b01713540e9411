"""``python -m mmrec.bench recurrence``: training tokens/s of a recipe with the ``exact``
recurrence (``mmrec::gated_rnn``) as a fraction of the same recipe with ``parallel``.

Both variants are built from one recipe (``model.recurrence.kind`` overridden in every
layer: a hybrid recipe's ``layer_overrides`` are dropped, so that all layers run the kind
timed), timed in
the same run with the same step as ``python -m mmrec.bench model``: forward, backward and
a fused AdamW update, bf16 parameters, each block compiled with ``torch.compile`` (the
op is opaque to the compiler through its fake kernel), a fixed number of tokens per step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mmrec
from mmrec.bench.common import record, run_metadata, write_json
from mmrec.bench.model import time_training_step

KINDS = ("parallel", "exact")


def add_subcommand(commands) -> None:
    parser = commands.add_parser("recurrence", help="training tokens/s with the exact recurrence vs parallel", description=__doc__)
    parser.add_argument("--recipe", default="1b")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for both variants")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.set_defaults(run=run)


def train_step_once(kind: str, length: int, args, device: torch.device) -> dict:
    overrides = ["model.layer_overrides=[]", *args.set, f"model.recurrence.kind={kind}",
                 f"model.max_seq_len={max(length, 2048)}"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = mmrec.build(args.recipe, overrides).to(dtype)
    row = time_training_step(model, length, args.tokens_per_step, device, not args.no_compile, args.steps, args.warmup)
    return {**row, "dtype": str(dtype).removeprefix("torch.")}


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    meta = {**run_metadata(), "recipe": args.recipe, "overrides": args.set, "compile": not args.no_compile,
            "tokens_per_step": args.tokens_per_step}
    rows = []
    for length in args.lengths:
        for kind in KINDS:
            record(rows, {"recurrence": kind, "length": length}, lambda: train_step_once(kind, length, args, device), device)
            torch._dynamo.reset()
        parallel, exact = rows[-2], rows[-1]
        if "tokens_per_s" in parallel and "tokens_per_s" in exact:
            exact["fraction_of_parallel"] = exact["tokens_per_s"] / parallel["tokens_per_s"]
    print(f"\n{meta['device']}, recipe {args.recipe} {' '.join(args.set)}, compile={meta['compile']}, "
          f"{args.tokens_per_step} tokens/step")
    print(f"{'recurrence':<10} {'T':>6} {'batch':>5} {'tokens/s':>10} {'ms/step':>9} {'peak GiB':>9} {'of parallel':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['recurrence']:<10} {r['length']:>6} {r['error']:>17}")
            continue
        fraction = f"{100 * r['fraction_of_parallel']:.1f}%" if "fraction_of_parallel" in r else ""
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['recurrence']:<10} {r['length']:>6} {r['batch']:>5} {r['tokens_per_s']:>10.0f} {r['ms_per_step']:>9.1f} {peak:>9} {fraction:>12}")
    write_json(args.out, {**meta, "results": rows})
    return 0

"""Decode speed and memory against context length: MM-Rec's constant-size state against a
Transformer's KV cache, same size, same run.

The state for a context of L tokens is made at its real shape without an L-token prefill
(decode cost depends on shapes, not values): an MM-Rec model runs a real forward over
the last ``L mod chunk_size`` tokens plus one chunk (its state is then exactly the size an
L-token context gives), a Transformer gets a KV cache of L random keys and values.
Each step feeds one token per sequence and carries the state, eagerly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mmrec
from mmrec.bench.common import compare_to_baseline, peak_memory_gib, record, reset_peak_memory, run_metadata, time_ms, write_json
from mmrec.state import State


def add_subcommand(commands) -> None:
    parser = commands.add_parser("decode", help="decode tokens/s and memory at several context lengths", description=__doc__)
    parser.add_argument("--recipes", nargs="+", default=["1b", "transformer-1b"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per repeat")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path)
    parser.set_defaults(run=run)


def state_at(model: mmrec.LanguageModel, batch: int, context: int, steps: int, device: torch.device) -> State:
    """A state of the shape a ``context``-token prefix leaves."""
    config = model.config
    if config.arch == "transformer":
        # a preallocated cache with room for the timed steps, as a serving stack would have
        shape = (batch, config.n_heads, context + 8 * steps, config.head_dim)
        dtype = model.embed.weight.dtype
        layers = [{"k": torch.randn(shape, device=device, dtype=dtype), "v": torch.randn(shape, device=device, dtype=dtype)}
                  for _ in range(config.n_layers)]
        return State(layers, context, model.config_json)
    prefix = context % config.chunk_size + config.chunk_size
    ids = torch.randint(0, config.vocab_size, (batch, prefix), device=device)
    state = model(ids).state
    state.position = context
    return state


@torch.no_grad()
def decode_once(model, batch, context, steps, device) -> dict:
    state = state_at(model, batch, context, steps, device)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    reset_peak_memory(device)

    def decode():
        s = state
        for _ in range(steps):
            s = model(token, state=s).state

    ms = time_ms(decode, device, warmup=1, repeat=3)
    return {"tokens_per_s": batch * steps / ms * 1e3, "ms_per_step": ms / steps, "peak_gib": peak_memory_gib(device),
            "state_gib": state.nbytes() / 2**30}


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    meta = {**run_metadata(), "dtype": args.dtype, "steps": args.steps}
    rows = []
    for recipe in args.recipes:
        with torch.device(device):
            model = mmrec.build(recipe).to(getattr(torch, args.dtype)).eval()
        for batch in args.batches:
            for context in args.contexts:
                row = {"recipe": recipe, "arch": model.config.arch, "batch": batch, "context": context}
                record(rows, row, lambda: decode_once(model, batch, context, args.steps, device), device)
        del model
        reset_peak_memory(device)
    compare_to_baseline(rows, ("batch", "context"), lambda r: r["arch"] == "transformer", "transformer")
    print(f"\n{meta['device']}, {args.dtype}, eager, {args.steps} steps")
    print(f"{'recipe':<16} {'batch':>5} {'context':>8} {'tokens/s':>10} {'peak GiB':>9} {'state GiB':>9} {'vs Transformer':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['recipe']:<16} {r['batch']:>5} {r['context']:>8} {r['error']:>10}")
            continue
        ratio = f"{r['speedup_vs_transformer']:.2f}x" if "speedup_vs_transformer" in r else ""
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['recipe']:<16} {r['batch']:>5} {r['context']:>8} {r['tokens_per_s']:>10.0f} {peak:>9} {r['state_gib']:>9.3f} {ratio:>15}")
    write_json(args.out, {**meta, "results": rows})
    return 0

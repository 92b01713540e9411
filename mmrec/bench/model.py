"""Training throughput: an MM-Rec recipe against the Transformer baseline of its size.

One training step is forward, backward and a fused AdamW update, with bf16 parameters
(as in the Transformer anchor), each block compiled with ``torch.compile`` (the blocks
are alike, so one compilation serves all), the same number of tokens per step at every
sequence length. MFU counts ``6 x parameters x tokens`` plus attention (causal
self-attention for the Transformer; memory reads and chunk writes for MM-Rec) over the
device's measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import mmrec
from mmrec.bench.common import (
    add_matmul_precision_argument, compare_to_baseline, peak_memory_gib, record, reset_peak_memory, run_metadata, time_ms, write_json,
)
from mmrec.bench.plot import plot
from mmrec.distributed import compile_blocks
from mmrec.throughput import keeping_matmul_precision, matmul_tflops


def add_subcommand(commands) -> None:
    parser = commands.add_parser("model", help="training tokens/s, MFU and peak memory vs a Transformer", description=__doc__)
    parser.add_argument("--recipes", nargs="+", default=["1b", "transformer-1b"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--checkpoint-from", type=int, default=32768, help="activation checkpointing at and above this length")
    parser.add_argument("--no-compile", action="store_true")
    add_matmul_precision_argument(parser)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw the results (matplotlib)")
    parser.set_defaults(run=run)


def time_training_step(model: mmrec.LanguageModel, length: int, tokens_per_step: int, device: torch.device,
                       compile: bool, steps: int, warmup: int = 3) -> dict:
    """Time one training step (forward, backward, fused AdamW) on random tokens; each block
    compiled when ``compile``. Returns batch, ms per step, tokens/s and peak memory."""
    model.train()
    if compile:
        compile_blocks(model)  # as training compiles them
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = max(1, tokens_per_step // length)
    ids = torch.randint(0, model.config.vocab_size, (batch, length + 1), device=device)

    def step():
        out = model(ids[:, :-1], return_aux_loss=True, return_state=False)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    ms = time_ms(step, device, warmup=warmup, repeat=steps)
    return {"batch": batch, "ms_per_step": ms, "tokens_per_s": batch * length / ms * 1e3,
            "peak_gib": peak_memory_gib(device), "parameters": model.num_parameters()}


def train_step_once(recipe: str, length: int, args, device: torch.device, peak_tflops: float) -> dict:
    with torch.device(device):
        model = mmrec.build(recipe, [f"model.max_seq_len={max(length, 2048)}"]).to(torch.bfloat16)
    model.set_activation_checkpointing(length >= args.checkpoint_from)
    row = time_training_step(model, length, args.tokens_per_step, device, not args.no_compile, args.steps)
    row["mfu"] = model.flops_per_token(length) * row["tokens_per_s"] / (peak_tflops * 1e12)
    row["activation_checkpointing"] = model.activation_checkpointing
    return row


def run(args: argparse.Namespace) -> int:
    with keeping_matmul_precision():
        torch.set_float32_matmul_precision(args.precision)
        return _run(args, torch.device(args.device))


def _run(args: argparse.Namespace, device: torch.device) -> int:
    peak = matmul_tflops(device) if device.type == "cuda" else float("nan")
    meta = {**run_metadata(), "dtype": "bfloat16", "compile": not args.no_compile, "float32_matmul_precision": args.precision, "matmul_tflops": peak,
            "tokens_per_step": args.tokens_per_step}
    print(f"{meta['device']}: bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for length in args.lengths:
        for recipe in args.recipes:
            record(rows, {"recipe": recipe, "length": length}, lambda: train_step_once(recipe, length, args, device, peak), device)
            torch._dynamo.reset()
    compare_to_baseline(rows, ("length",), lambda r: r["recipe"].startswith("transformer"), "transformer")
    print(f"\n{meta['device']}, bf16, compile={meta['compile']}, {args.tokens_per_step} tokens/step")
    print(f"{'recipe':<16} {'T':>6} {'batch':>5} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs Transformer':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['recipe']:<16} {r['length']:>6} {r['error']:>17}")
            continue
        ratio = f"{r['speedup_vs_transformer']:.2f}x" if "speedup_vs_transformer" in r else ""
        peak_mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['recipe']:<16} {r['length']:>6} {r['batch']:>5} {r['tokens_per_s']:>10.0f} {100 * r['mfu']:>5.1f}% {peak_mem:>9} {ratio:>15}")
    payload = {**meta, "results": rows}
    write_json(args.out, payload)
    if args.plot:
        print(f"wrote {plot(payload, args.plot)}")
    return 0

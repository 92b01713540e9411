"""Decode speed and memory against context length: MM-Rec's constant-size state against a
Transformer's KV cache, same size, same run.

The state for a context of L tokens is made at its real shape without an L-token prefill
(decode cost depends on shapes, not values): an MM-Rec model runs a real forward over
the last ``L mod chunk_size`` tokens plus one chunk (its state is then exactly the size an
L-token context gives), a Transformer gets a KV cache of L random keys and values.
Each step feeds one token per sequence and carries the state, in one of two modes:

- ``eager``: ``model(token, state=s)``, every kernel launched from Python;
- ``graph``: ``mmrec.decode.StaticDecoder``, static buffers and one CUDA graph replayed
  per step, for both models (the Transformer with a preallocated cache of the maximum
  length, masked past the position, as gpt-fast does). Its attention is timed both
  through SDPA with that mask and through split-KV matmuls (``--kv-splits``); the
  ratio is taken against the faster of the two. ``--compile on`` (or ``both``) also
  runs each block's step through ``torch.compile`` before the capture, for both models.

An MM-Rec step that completes a memory chunk also writes the chunk to the memory (a
second CUDA graph in graph mode). Few timed steps complete a chunk (none from the
default contexts, multiples of the chunk), so in graph mode chunk-completing steps are
also timed apart (``chunk_end_ms``) and counted once per ``chunk_size`` steps in
``ms_per_step`` and tokens/s; ``step_ms`` is the other steps' time.

What to expect, not a result: at batch 1 a decode step reads the weights (about 2.7 GB
in bf16 for either 1b model) and, for the Transformer, its whole KV cache (about 6 GB at
32K context, 24 GB at 128K), while MM-Rec reads a state of a few tens of MB whatever the
context; so once launches no longer dominate the ratio at 32K is bounded by roughly
(2.7 + 6) / 2.7, a few x, and grows with the context. Only the measured figures count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mmrec
from mmrec.bench.common import peak_memory_gib, record, reset_peak_memory, run_metadata, time_ms, write_json
from mmrec.bench.plot import plot
from mmrec.decode import StaticDecoder
from mmrec.layers.transformer_block import TransformerBlock
from mmrec.state import State

WARMUP, REPEAT = 1, 3  # timed calls of `steps` steps each


def add_subcommand(commands) -> None:
    parser = commands.add_parser("decode", help="decode tokens/s and memory at several context lengths", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["1b", "transformer-1b"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", choices=["eager", "graph"], default=["eager", "graph"])
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="graph mode: torch.compile each block's step before the capture (both: time it with and without)")
    parser.add_argument("--kv-splits", type=int, nargs="+", default=[0, 16],
                        help="Transformer attention in graph mode: 0 = SDPA with a mask, n = split-KV matmuls in n blocks")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per repeat")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw the results (matplotlib)")
    parser.set_defaults(run=run)


def state_at(model: mmrec.LanguageModel, batch: int, context: int, room: int, device: torch.device) -> State:
    """A state of the shape a ``context``-token prefix leaves (a Transformer's cache with
    ``room`` free entries after it)."""
    config = model.config
    if config.arch == "transformer":
        shape = (batch, config.n_heads, context + room, config.head_dim)
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
def decode_once(model, batch, context, steps, device, mode, kv_splits=0, compile=False) -> dict:
    steps_run = (WARMUP + REPEAT) * steps
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    if mode == "eager":
        # a preallocated cache with room for the timed steps, as a serving stack would have
        state = state_at(model, batch, context, 8 * steps, device)
        state_bytes = state.nbytes()
        reset_peak_memory(device)

        def decode():
            s = state
            for _ in range(steps):
                s = model(token, state=s).state
    else:
        # a Transformer's cache made with room for the timed steps is donated, not copied
        length = context + steps_run
        room = -(-length // TransformerBlock.CACHE_ROUND) * TransformerBlock.CACHE_ROUND
        state = state_at(model, batch, context, room - context, device)
        decoder = StaticDecoder(model, state, max_length=length, kv_splits=kv_splits, compile=compile, donate_state=True)
        del state
        state_bytes = decoder.nbytes()
        reset_peak_memory(device)

        def decode():
            for _ in range(steps):
                decoder.step(token)

    step_ms = time_ms(decode, device, warmup=WARMUP, repeat=REPEAT) / steps
    result = {"ms_per_step": step_ms}
    if mode == "graph" and decoder.chunk_size is not None:
        chunk = decoder.chunk_size

        def chunk_ends():
            for _ in range(steps):
                # the host's count of tokens picks the step; the values do not matter here
                decoder.length = chunk - 1
                decoder.step(token)

        chunk_end_ms = time_ms(chunk_ends, device, warmup=WARMUP, repeat=REPEAT) / steps
        result = {"ms_per_step": ((chunk - 1) * step_ms + chunk_end_ms) / chunk, "step_ms": step_ms, "chunk_end_ms": chunk_end_ms}
    return {"tokens_per_s": batch / result["ms_per_step"] * 1e3, **result, "peak_gib": peak_memory_gib(device),
            "state_gib": state_bytes / 2**30}


def compare(rows: list[dict]) -> None:
    """Each MM-Rec row's speed and memory relative to the fastest Transformer row of the
    same mode (compiled or not), batch and context."""
    key = lambda r: (r["mode"], r["compiled"], r["batch"], r["context"])  # noqa: E731
    best: dict = {}
    for r in rows:
        if r["arch"] == "transformer" and "tokens_per_s" in r and r["tokens_per_s"] > best.get(key(r), {}).get("tokens_per_s", 0):
            best[key(r)] = r
    for r in rows:
        other = best.get(key(r))
        if r["arch"] == "transformer" or other is None or "tokens_per_s" not in r:
            continue
        r["speedup_vs_transformer"] = r["tokens_per_s"] / other["tokens_per_s"]
        r["transformer_attention"] = other["attention"]
        if r.get("peak_gib") and other.get("peak_gib"):
            r["memory_vs_transformer"] = r["peak_gib"] / other["peak_gib"]


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if "graph" in args.modes and device.type != "cuda":
        print("note: no CUDA device, so graph mode runs the static step without a graph")
    meta = {**run_metadata(), "dtype": args.dtype, "steps": args.steps}
    rows = []
    for recipe in args.recipes:
        with torch.device(device):
            model = mmrec.build(recipe).to(getattr(torch, args.dtype)).eval()
        transformer = model.config.arch == "transformer"
        for mode in args.modes:
            variants = args.kv_splits if (mode == "graph" and transformer) else [0]
            compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile] if mode == "graph" else [False]
            for compiled in compiles:
                for batch in args.batches:
                    for context in args.contexts:
                        for splits in variants:
                            attention = ("sdpa" if splits == 0 else f"split{splits}") if transformer else "-"
                            row = {"recipe": recipe, "arch": model.config.arch, "mode": mode, "compiled": compiled,
                                   "attention": attention, "batch": batch, "context": context}
                            record(rows, row, lambda: decode_once(model, batch, context, args.steps, device, mode, splits, compiled),
                                   device)
                            if compiled:  # compiled code can hold the last decoder's buffers
                                torch._dynamo.reset()
                                reset_peak_memory(device)
        del model
        reset_peak_memory(device)
    compare(rows)
    print(f"\n{meta['device']}, {args.dtype}, {args.steps} steps")
    print(f"{'recipe':<16} {'mode':<13} {'attn':<8} {'batch':>5} {'context':>8} {'tokens/s':>10} {'ms/step':>8} "
          f"{'peak GiB':>9} {'state GiB':>9} {'vs Transformer':>15}")
    for r in rows:
        mode = r["mode"] + ("+compile" if r["compiled"] else "")
        head = f"{r['recipe']:<16} {mode:<13} {r['attention']:<8} {r['batch']:>5} {r['context']:>8}"
        if "error" in r:
            print(f"{head} {r['error']:>10}")
            continue
        ratio = f"{r['speedup_vs_transformer']:.2f}x" if "speedup_vs_transformer" in r else ""
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{head} {r['tokens_per_s']:>10.0f} {r['ms_per_step']:>8.2f} {peak:>9} {r['state_gib']:>9.3f} {ratio:>15}")
    payload = {**meta, "results": rows}
    write_json(args.out, payload)
    if args.plot:
        print(f"wrote {plot(payload, args.plot)}")
    return 0

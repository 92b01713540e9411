"""``python -m mmrec.bench gated-rnn``: the ``exact`` recurrence's fused op against the
eager per-step PyTorch loop, same shapes, same run.

For each batch size and sequence length it times ``mmrec::gated_rnn`` (the fused Triton
kernel on CUDA, the step loop on CPU), forward alone and forward+backward, and the same
two passes of ``gated_rnn_reference`` (one ``einsum``, ``sigmoid`` and update per step,
autograd for the backward). It prints tokens/s (batch x length over the median time)
and the ratio op/loop of the two rates. A configuration that runs out of memory is
recorded as such.

The loop costs the same per step at any length, so past ``--loop-max-steps`` it is timed
on that prefix of the sequence and its time scaled by ``T / steps`` (the row says
``loop_steps_timed`` and ``scaled_from_prefix``; the table marks it with ``*``); its error
against the op is then taken on that prefix. Each ``--config`` (``KEY=VALUE,...`` with the
keys of ``mmrec.ops.gated_rnn_triton.pick_config``: ``BLOCK_B``, ``num_warps``, ``SPLIT``,
``PRECISION``) adds rows ``kernel[...]`` that call the Triton launchers directly with that
launch config (forward, and forward then backward), for sweeping one GPU run. Inputs are fresh random tensors: ``z ~ N(0, 1)``, ``log γ`` in
[-1, -0.01), ``W_g ~ N(0, 0.25/E)``, ``h0 ~ N(0, 1)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmrec.bench.common import (
    peak_memory_gib,
    record,
    reset_peak_memory,
    run_metadata,
    time_ms,
    write_json,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "fwd+bwd")


def add_subcommand(commands) -> None:
    parser = commands.add_parser(
        "gated-rnn", help="gated_rnn op (exact recurrence) vs the eager per-step loop",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128, help="d_model = heads x head-dim")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of z, W_g and h0")
    parser.add_argument("--decay-dtype", choices=sorted(DTYPES), help="dtype of log γ (default: --dtype); sets the output dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-loop", action="store_true", help="time the op only")
    parser.add_argument("--loop-max-steps", type=int, default=2048, help="time the loop on at most this many steps, then scale")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE,...",
                        help="also time the Triton kernels with this launch config (repeatable), e.g. BLOCK_B=32,num_warps=8")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.set_defaults(run=run)


def make_inputs(batch: int, length: int, heads: int, head_dim: int, dtype, decay_dtype, device, gen):
    dim = heads * head_dim

    def draw(fn, *shape):
        return fn(*shape, generator=gen, device=device, dtype=torch.float32)

    z = draw(torch.randn, batch, length, dim).to(dtype)
    log_decay = (draw(torch.rand, batch, length, dim) * -0.99 - 0.01).to(decay_dtype)
    weight = (draw(torch.randn, heads, head_dim, head_dim) * 0.5 / head_dim**0.5).to(dtype)
    h0 = draw(torch.randn, batch, dim).to(dtype)
    return z, log_decay, weight, h0


def _passes(fn, inputs, grad_h):
    """(forward, forward+backward) callables of ``fn`` on ``inputs``."""
    leaves = [x.detach().requires_grad_() for x in inputs]

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def forward_backward():
        h, _ = fn(*leaves)
        return torch.autograd.grad(h, leaves, grad_h)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def _rel_err(x, ref) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm())


def parse_config(text: str) -> dict:
    """``"BLOCK_B=32,num_warps=8,SPLIT=false"`` -> ``{"BLOCK_B": 32, "num_warps": 8, "SPLIT": False}``."""
    config = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config entries look like KEY=VALUE, got {item!r}")
        if value.lower() in ("true", "false"):
            config[key.strip()] = value.lower() == "true"
        else:
            config[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return config


def _kernel_passes(config: dict, inputs, grad_h):
    """(forward, forward+backward) of the Triton launchers with ``config``, no autograd."""
    from mmrec.ops import gated_rnn_triton as kernels

    def forward():
        return kernels.gated_rnn_forward(*inputs, config=config)

    def forward_backward():
        h, _ = kernels.gated_rnn_forward(*inputs, config=config)
        return kernels.gated_rnn_backward(*inputs, h, grad_h, None, config=config)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def bench_once(args, batch: int, length: int, device: torch.device, gen) -> list[dict]:
    from mmrec.ops.gated_rnn import gated_rnn, gated_rnn_reference

    dtype = DTYPES[args.dtype]
    decay_dtype = DTYPES[args.decay_dtype or args.dtype]
    inputs = make_inputs(batch, length, args.heads, args.head_dim, dtype, decay_dtype, device, gen)
    grad_h = torch.randn(inputs[1].shape, generator=gen, device=device).to(decay_dtype)
    loop_steps = min(length, args.loop_max_steps)
    prefix = (*(x[:, :loop_steps] for x in inputs[:2]), *inputs[2:])
    impls = {"op": (_passes(gated_rnn, inputs, grad_h), length)}
    for text in args.config:
        config = parse_config(text)
        impls[f"kernel[{text}]"] = (_kernel_passes(config, inputs, grad_h), length)
    if not args.no_loop:
        impls["loop"] = (_passes(gated_rnn_reference, prefix, grad_h[:, :loop_steps]), loop_steps)
    rows = []
    outputs = {}
    for impl, (passes, steps) in impls.items():
        for pass_, call in passes.items():
            row = {"impl": impl, "pass": pass_, "batch": batch, "length": length, "heads": args.heads, "head_dim": args.head_dim}
            if steps < length:
                row.update(loop_steps_timed=steps, scaled_from_prefix=True)

            def measure(call=call, impl=impl, pass_=pass_, steps=steps):
                reset_peak_memory(device)
                ms = time_ms(call, device, warmup=args.warmup, repeat=args.repeat) * length / steps
                if pass_ == "fwd":
                    outputs[impl] = call()[0][:, :loop_steps].clone()  # the prefix the loop ran
                return {"ms": ms, "tokens_per_s": batch * length / ms * 1e3, "peak_gib": peak_memory_gib(device)}

            record(rows, row, measure, device)
    if "loop" in outputs:
        for row in rows:
            if row["impl"] in outputs and row["impl"] != "loop":
                row["rel_err_vs_loop"] = _rel_err(outputs[row["impl"]], outputs["loop"])
    del outputs
    # each implementation's rate over the loop's, per pass
    rates = {(r["impl"], r["pass"]): r.get("tokens_per_s") for r in rows}
    for row in rows:
        rate, loop = rates.get((row["impl"], row["pass"])), rates.get(("loop", row["pass"]))
        if row["impl"] != "loop" and rate and loop:
            row["over_loop"] = rate / loop
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    meta = {**run_metadata(), "dtype": args.dtype, "decay_dtype": args.decay_dtype or args.dtype,
            "heads": args.heads, "head_dim": args.head_dim, "d_model": args.heads * args.head_dim,
            "loop_max_steps": args.loop_max_steps, "configs": [parse_config(c) for c in args.config]}
    if device.type == "cuda":
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for batch in args.batches:
        for length in args.lengths:
            rows.extend(bench_once(args, batch, length, device, gen))

    print(f"\n{meta['device']}, gated_rnn, d_model {meta['d_model']} = {args.heads} heads x {args.head_dim}, "
          f"{args.dtype} inputs, log γ in {meta['decay_dtype']}")
    print("(* the loop timed on a prefix of the sequence and scaled to its length)")
    print(f"{'batch':>5} {'length':>7} {'pass':<8} {'impl':<32} {'tok/s':>12} {'loop tok/s':>12} {'x loop':>8} {'ms':>10} {'peak GiB':>9}")
    by_key = {(r["batch"], r["length"], r["impl"], r["pass"]): r for r in rows}
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "loop"))
    for batch in args.batches:
        for length in args.lengths:
            for pass_ in PASSES:
                loop = by_key.get((batch, length, "loop", pass_), {})
                loop_rate = f"{loop['tokens_per_s']:.4g}" if "tokens_per_s" in loop else loop.get("error", "-")
                loop_rate += "*" if loop.get("scaled_from_prefix") else ""
                for impl in impls:
                    r = by_key.get((batch, length, impl, pass_), {})
                    rate = f"{r['tokens_per_s']:.4g}" if "tokens_per_s" in r else r.get("error", "-")
                    ratio = f"{r['over_loop']:.1f}x" if "over_loop" in r else "-"
                    ms = f"{r['ms']:.3f}" if "ms" in r else "-"
                    peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
                    print(f"{batch:>5} {length:>7} {pass_:<8} {impl:<32} {rate:>12} {loop_rate:>12} {ratio:>8} {ms:>10} {peak:>9}")
    write_json(args.out, {**meta, "results": rows})
    return 0

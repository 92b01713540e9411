"""``python -m mmrec.bench gated-rnn``: the ``exact`` recurrence's fused op against the
eager per-step PyTorch loop, same shapes, same run.

For each batch size and sequence length it times ``mmrec::gated_rnn`` (the fused Triton
kernel on CUDA, the step loop on CPU), forward alone and forward+backward, and the same
two passes of ``gated_rnn_reference`` (one ``einsum``, ``sigmoid`` and update per step,
autograd for the backward). It prints tokens/s (batch x length over the median time)
and the ratio op/loop of the two rates. A configuration that runs out of memory is
recorded as such. Inputs are fresh random tensors: ``z ~ N(0, 1)``, ``log γ`` in
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


def bench_once(args, batch: int, length: int, device: torch.device, gen) -> list[dict]:
    from mmrec.ops.gated_rnn import gated_rnn, gated_rnn_reference

    dtype = DTYPES[args.dtype]
    decay_dtype = DTYPES[args.decay_dtype or args.dtype]
    inputs = make_inputs(batch, length, args.heads, args.head_dim, dtype, decay_dtype, device, gen)
    grad_h = torch.randn(inputs[1].shape, generator=gen, device=device).to(decay_dtype)
    impls = {"op": gated_rnn} if args.no_loop else {"op": gated_rnn, "loop": gated_rnn_reference}
    rows = []
    outputs = {}
    for impl, fn in impls.items():
        for pass_, call in _passes(fn, inputs, grad_h).items():
            row = {"impl": impl, "pass": pass_, "batch": batch, "length": length, "heads": args.heads, "head_dim": args.head_dim}

            def measure(call=call, impl=impl, pass_=pass_):
                reset_peak_memory(device)
                ms = time_ms(call, device, warmup=args.warmup, repeat=args.repeat)
                if pass_ == "fwd":
                    outputs[impl] = call()[0]
                return {"ms": ms, "tokens_per_s": batch * length / ms * 1e3, "peak_gib": peak_memory_gib(device)}

            record(rows, row, measure, device)
    if "loop" in outputs and "op" in outputs:
        err = _rel_err(outputs["op"], outputs["loop"])
        for row in rows:
            row["rel_err_op_vs_loop"] = err
    del outputs
    # the op's rate over the loop's, per pass
    rates = {(r["impl"], r["pass"]): r.get("tokens_per_s") for r in rows}
    for row in rows:
        op, loop = rates.get(("op", row["pass"])), rates.get(("loop", row["pass"]))
        if row["impl"] == "op" and op and loop:
            row["op_over_loop"] = op / loop
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    meta = {**run_metadata(), "dtype": args.dtype, "decay_dtype": args.decay_dtype or args.dtype,
            "heads": args.heads, "head_dim": args.head_dim, "d_model": args.heads * args.head_dim}
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
    print(f"{'batch':>5} {'length':>7} {'pass':<8} {'op tok/s':>12} {'loop tok/s':>12} {'op/loop':>8} {'op ms':>10} {'op peak GiB':>11}")
    by_key = {(r["batch"], r["length"], r["impl"], r["pass"]): r for r in rows}
    for batch in args.batches:
        for length in args.lengths:
            for pass_ in PASSES:
                op = by_key.get((batch, length, "op", pass_), {})
                loop = by_key.get((batch, length, "loop", pass_), {})

                def rate(r):
                    return f"{r['tokens_per_s']:.4g}" if "tokens_per_s" in r else r.get("error", "-")

                ratio = f"{op['op_over_loop']:.1f}x" if "op_over_loop" in op else "-"
                ms = f"{op['ms']:.3f}" if "ms" in op else "-"
                peak = f"{op['peak_gib']:.2f}" if op.get("peak_gib") is not None else "-"
                print(f"{batch:>5} {length:>7} {pass_:<8} {rate(op):>12} {rate(loop):>12} {ratio:>8} {ms:>10} {peak:>11}")
    write_json(args.out, {**meta, "results": rows})
    return 0

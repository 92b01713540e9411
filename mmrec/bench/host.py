"""``python -m mmrec.bench host``: the host (CPU) time of one call of each op the model
calls, against the GPU time of the same call, in one run.

A call's host time is what Python, autograd, the dispatcher and the kernel launches cost
before control returns, without waiting for its kernels: measured for one call from an
idle GPU (``host ms``, ``common.host_ms``) and per call of calls issued back to back, as a
training loop issues them (``loop ms``, ``common.host_loop_ms``), each the median of
``--rounds`` timings (their range is in the JSON). The rounds go over every row in turn,
so a slow stretch of the host (another process, a clock change) touches several rows
once each rather than all of one row's timings. Its GPU time is the same call
captured once as a CUDA graph and replayed (``common.graph_ms``). A call whose host time exceeds its GPU time
leaves the GPU idle in eager mode; under ``torch.compile`` with CUDA graphs, or when the
GPU queue is already full, the host time is hidden.

Each op is timed as the layers call it, at ``--batch`` x ``--length`` tokens:
- ``linear_scan``: the ``parallel`` recurrence's call (``log γ`` and inputs in bf16,
  a float32 ``h0``, ``log_space``, bf16 ``h``), ``[B, T, --dim]``;
- ``gated_rnn``: the ``exact`` recurrence's call, ``--dim`` channels in heads of 64;
- ``delta_chunk_scan``: the chunk loop of the ``delta`` rule (its inputs as
  ``chunk_delta_rule`` prepares them), ``--heads`` heads of 128, chunks of 64;
- ``chunk_delta_rule``: the whole ``delta`` rule function (its two ops,
  ``delta_chunk_prepare`` and ``delta_chunk_scan``), for comparison.

Rows: the op through its public function (``op``: its input checks, the custom-op dispatch,
autograd) and its Triton launchers called directly (``launch``: what the kernels' own
launch costs), forward (no gradient) and forward + backward (``torch.autograd.grad`` of
every differentiable output, with ones as their gradients; the ``launch`` backward gets no
gradient of the final state). ``op`` ``bwd`` is the backward op alone, called as the op's
``autograd.Function`` calls it: the op call of a backward pass, where ``fwd+bwd`` also
counts autograd's own work and the PyTorch products around the kernels. The ``op`` calls
pass an initial state, as a layer fed in pieces does. ``delta_chunk_prepare`` is the
``delta`` rule's other op (the chunk-local matrices). The
baseline row is ``torch.cumsum`` on the scan's input, a built-in op of the same shape with
its own autograd formula, timed in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mmrec.bench.common import forward_passes, graph_ms, host_loop_ms, host_ms, run_metadata, write_json
from mmrec.bench.delta import chunk_scan_inputs, make_inputs

GOAL_MS = 0.1  # host time per call the recall issue asks of every op
# the calls it counts: each op's forward and backward op call (not a whole fwd+bwd, which
# includes autograd's own work, nor chunk_delta_rule, a function of two ops)
GOAL_OPS, GOAL_PASSES = ("linear_scan", "gated_rnn", "delta_chunk_prepare", "delta_chunk_scan"), ("fwd", "bwd")


def add_subcommand(commands) -> None:
    parser = commands.add_parser("host", help="host time per call of each op vs its GPU time",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=4096, help="channels of linear_scan and gated_rnn")
    parser.add_argument("--heads", type=int, default=16, help="heads of the delta rule (width 128)")
    parser.add_argument("--calls", type=int, default=50, help="calls per median")
    parser.add_argument("--rounds", type=int, default=5,
                        help="time every row this many times, in turn, and report the median (the host's own noise is large)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.set_defaults(run=run)


Passes = dict[str, Callable[[], object]]  # pass name -> one call


def _ones_like(outputs):
    return [torch.ones_like(o) for o in outputs]


def _linear_scan(args, device, gen) -> dict[str, Passes]:
    ops = importlib.import_module("mmrec.ops.linear_scan")  # the module: mmrec.ops exports a function of its name
    linear_scan = ops.linear_scan

    shape = (args.batch, args.length, args.dim)
    log_a = (-torch.rand(shape, device=device, generator=gen) * 0.1).bfloat16()
    b = torch.randn(shape, device=device, generator=gen).bfloat16()
    h0 = torch.randn(args.batch, args.dim, device=device, generator=gen)
    call = lambda a, b, h0: linear_scan(a, b, h0, log_space=True, out_dtype=torch.bfloat16)  # noqa: E731
    h, _ = call(log_a, b, h0)
    grad_h = torch.ones_like(h)
    found = {"op": {**forward_passes(call, [log_a, b, h0], _ones_like),
                    "bwd": lambda: ops._backward_op.below_autograd(log_a, h, grad_h, None, h0, False, b.dtype, True, False)},
             "torch.cumsum (baseline)": forward_passes(lambda b: (torch.cumsum(b, 1),), [b], _ones_like)}
    if device.type == "cuda":
        from mmrec.ops import linear_scan_triton as kernels

        found["launch"] = {
            "fwd": lambda: kernels.scan_forward(log_a, b, h0, log_space=True, out_dtype=torch.bfloat16),
            "bwd": lambda: kernels.scan_backward(log_a, h, grad_h, None, h0, False, b.dtype, log_space=True)}
    return found


def _gated_rnn(args, device, gen) -> dict[str, Passes]:
    ops = importlib.import_module("mmrec.ops.gated_rnn")  # the module, as above
    gated_rnn = ops.gated_rnn

    head_dim = 64
    shape = (args.batch, args.length, args.dim)
    z = torch.randn(shape, device=device, generator=gen).bfloat16()
    log_decay = -torch.rand(shape, device=device, generator=gen) * 0.1
    weight = torch.randn(args.dim // head_dim, head_dim, head_dim, device=device, generator=gen) / head_dim**0.5
    h0 = torch.randn(args.batch, args.dim, device=device, generator=gen)
    h, _ = gated_rnn(z, log_decay, weight, h0)
    grad_h = torch.ones_like(h)
    found = {"op": {**forward_passes(gated_rnn, [z, log_decay, weight, h0], _ones_like),
                    "bwd": lambda: ops._backward_op.below_autograd(z, log_decay, weight, h0, h, grad_h, None)}}
    if device.type == "cuda":
        from mmrec.ops import gated_rnn_triton as kernels

        found["launch"] = {"fwd": lambda: kernels.gated_rnn_forward(z, log_decay, weight, h0),
                           "bwd": lambda: kernels.gated_rnn_backward(z, log_decay, weight, h0, h, grad_h, None)}
    return found


def _delta_inputs(args, device, gen) -> list[torch.Tensor]:
    """``q, k, v, beta, log_alpha, state`` as the ``delta`` layer gives them, heads of 128."""
    return list(make_inputs(args.batch, args.length, args.heads, 128, torch.bfloat16, device, gen))


def _delta_rule(args, device, gen) -> dict[str, Passes]:
    from mmrec.ops.delta_rule import chunk_delta_rule

    inputs = _delta_inputs(args, device, gen)
    return {"op": forward_passes(chunk_delta_rule, inputs, _ones_like)}


def _delta_chunk_prepare(args, device, gen) -> dict[str, Passes]:
    from mmrec.ops.delta_rule import chunk_prepare as ops

    q, k, v, beta, log_alpha, _ = _delta_inputs(args, device, gen)
    outputs = ops.delta_chunk_prepare(q, k, v, beta, log_alpha, 64)
    grads = [torch.ones_like(x) for x in outputs[:6]]
    call = lambda *inputs: ops.delta_chunk_prepare(*inputs, 64)[:6]  # noqa: E731 (X: not differentiable)
    return {"op": {**forward_passes(call, [q, k, v, beta, log_alpha], _ones_like),
                   "bwd": lambda: ops._backward_op.below_autograd(q, k, v, beta, log_alpha, outputs[6], outputs[4],
                                                                  *grads, 64)}}


def _delta_chunk_scan(args, device, gen) -> dict[str, Passes]:
    from mmrec.ops.delta_rule import chunk_scan as ops

    op_inputs = list(chunk_scan_inputs(_delta_inputs(args, device, gen), 64))
    o, final, _ = ops.delta_chunk_scan(*op_inputs)
    grad_o, grad_final = torch.ones_like(o), torch.ones_like(final)
    found = {"op": {**forward_passes(ops.delta_chunk_scan, op_inputs, _ones_like),
                    "bwd": lambda: ops._adjoint_op.below_autograd(*op_inputs[1:6], grad_o, grad_final)}}
    if device.type == "cuda":
        from mmrec.ops.delta_rule import chunk_scan_triton as kernels

        found["launch"] = {"fwd": lambda: kernels.chunk_scan_forward(*op_inputs),
                           "bwd": lambda: kernels.chunk_scan_adjoint(*op_inputs[1:6], grad_o, grad_final)}
    return found


OPS = {"linear_scan": _linear_scan, "gated_rnn": _gated_rnn, "delta_chunk_prepare": _delta_chunk_prepare,
       "delta_chunk_scan": _delta_chunk_scan, "chunk_delta_rule": _delta_rule}


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type != "cuda":
        print("no CUDA device: every call runs synchronously on the CPU, so 'host' is the whole call "
              "(a smoke test of the benchmark, not a measurement)", file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(0)
    meta = {**run_metadata(), "batch": args.batch, "length": args.length, "dim": args.dim, "heads": args.heads,
            "calls": args.calls, "rounds": args.rounds}
    calls = {(op, impl, pass_): call for op, prepare in OPS.items()
             for impl, passes in prepare(args, device, gen).items() for pass_, call in passes.items()}
    host, loop = {key: [] for key in calls}, {key: [] for key in calls}
    for round_ in range(args.rounds):
        for key, call in calls.items():
            host[key].append(host_ms(call, args.calls))
            loop[key].append(host_loop_ms(call, args.calls))
        print(f"round {round_ + 1} of {args.rounds} timed", file=sys.stderr, flush=True)
    rows = []
    print(f"{meta['device']}: host and GPU milliseconds per call, batch {args.batch}, T {args.length}")
    print(f"{'op':<20} {'impl':<24} {'pass':<8} {'host ms':>8} {'loop ms':>8} {'GPU ms':>8}")
    for (op, impl, pass_), call in calls.items():
        h, lp = sorted(host[op, impl, pass_]), sorted(loop[op, impl, pass_])
        row = {"op": op, "impl": impl, "pass": pass_, "host_ms": h[len(h) // 2], "host_loop_ms": lp[len(lp) // 2],
               "host_ms_range": [h[0], h[-1]], "host_loop_ms_range": [lp[0], lp[-1]],
               "gpu_ms": graph_ms(call) if device.type == "cuda" else None}
        rows.append(row)
        gpu = "-" if row["gpu_ms"] is None else f"{row['gpu_ms']:.3f}"
        print(f"{op:<20} {impl:<24} {pass_:<8} {row['host_ms']:>8.3f} {row['host_loop_ms']:>8.3f} {gpu:>8}", flush=True)
    ops = [r for r in rows if r["impl"] == "op" and r["pass"] in GOAL_PASSES and r["op"] in GOAL_OPS]
    over = [f"{r['op']} {r['pass']}" for r in ops if min(r["host_ms"], r["host_loop_ms"]) > GOAL_MS]
    print(f"\nhost time per op call under {GOAL_MS} ms: " + ("every op" if not over else "not " + ", ".join(over)))
    write_json(args.out, {**meta, "goal_host_ms": GOAL_MS, "results": rows})
    return 0

"""``python -m mmrec.bench delta``: the chunked delta rule with its chunk loop as the op
``mmrec::delta_chunk_scan`` (Triton on CUDA) against the same chunked form with the loop
in PyTorch (one batched step per chunk, autograd for the backward), same inputs, same run.

For each head size and sequence length (batch = ``--tokens`` / length) it times
``chunk_delta_rule`` forward alone and forward+backward, and prints tokens/s, the ratio
op/loop and the op's error against the loop (outputs and gradients). Both run under each
``--precision`` (``torch.set_float32_matmul_precision``: ``highest`` keeps fp32 products,
``tf32x3`` in the kernels; ``high`` allows tf32 in cuBLAS and the kernels). Inputs as the
``delta`` layer gives them: unit-norm ``q``, ``k`` in float32, ``v`` in ``--dtype``, β in
(0, 1), log α in (-0.05, 0), a random initial state. ``--kernels`` adds the chunk scan's Triton
launchers alone (the forward scan, the adjoint scan of the backward; with the default config
also the PyTorch products of the gradients that sum over ``V``, the rest of the op's backward) with their default
launch config and each ``--config`` (``KEY=VALUE,...``: ``BLOCK_V``, ``num_warps``,
``STAGES``, ``PRECISION``), and the chunk preparation's two launchers (forward, backward)
with theirs and each ``--prepare-config`` (``BLOCK_D``, ``num_warps``, ``INVERSE``), for
tuning in one GPU run. The op runs twice, as ``chunk_delta_rule`` defaults to and with
``intermediates=torch.bfloat16`` (the chunk's matrices, outputs and stored states in bf16
between the ops, as fla keeps them; ``--no-bf16-intermediates`` leaves that out), and so
do the launchers (rows marked ``bf16``).

The baselines, when installed: flash-linear-attention's ``chunk_gated_delta_rule`` (the
same recurrence: ``g`` = log α, its ``q``, ``k``, ``v``, ``β`` in ``v``'s dtype, ``scale`` 1),
timed and checked against the loop the same way, and its ``chunk_delta_rule``, the same
recurrence without the decay (less work), timed only: fla 0.6's gated backward refuses
Hopper with Triton < 3.7.1, its ungated one does not. A baseline that refuses the device or
fails to import is reported with its message. fla's ``q`` and ``k`` are in ``v``'s dtype
where the op's are float32, so with bf16 ``v`` its error against the loop includes their
rounding (the row's ``qk_dtype``).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from mmrec.bench.common import forward_passes, peak_memory_gib, record, reset_peak_memory, run_metadata, time_ms, write_json
from mmrec.bench.gated_rnn import parse_config
from mmrec.throughput import keeping_matmul_precision

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FLA_GATED = "fla chunk_gated_delta_rule"
FLA_UNGATED = "fla chunk_delta_rule (α = 1)"
OP_BF16 = "op, bf16 intermediates"
SAME_RECURRENCE = ("op", OP_BF16, FLA_GATED)  # compared with the loop's outputs


def add_subcommand(commands) -> None:
    parser = commands.add_parser("delta", help="chunked delta rule: the chunk-loop op vs the PyTorch loop",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="batch x length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="K = V")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of v (q, k, β, log α: float32)")
    parser.add_argument("--precision", nargs="+", choices=["highest", "high"], default=["highest", "high"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both versions (as training compiles blocks)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="leave out fla's chunk_gated_delta_rule and chunk_delta_rule (timed when installed)")
    parser.add_argument("--kernels", action="store_true", help="also time the Triton launchers alone")
    parser.add_argument("--no-bf16-intermediates", dest="bf16_intermediates", action="store_false",
                        help="leave out the op (and launchers) with the chunk's matrices stored in bf16")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE,...",
                        help="with --kernels: also time the chunk scan's launchers with this launch config (repeatable)")
    parser.add_argument("--prepare-config", action="append", default=[], metavar="KEY=VALUE,...",
                        help="with --kernels: also time the chunk preparation's launchers (forward and backward, "
                             "both with this launch config) "
                             "(BLOCK_D, num_warps, INVERSE=rows|blocks|compact, PRECISION; repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.set_defaults(run=run)


def make_inputs(batch: int, length: int, heads: int, head_dim: int, dtype, device, gen):
    def draw(fn, *shape):
        return fn(*shape, generator=gen, device=device, dtype=torch.float32)

    q = F.normalize(draw(torch.randn, batch, length, heads, head_dim), dim=-1)
    k = F.normalize(draw(torch.randn, batch, length, heads, head_dim), dim=-1)
    v = draw(torch.randn, batch, length, heads, head_dim).to(dtype)
    beta = draw(torch.rand, batch, length, heads)
    log_alpha = -0.05 * draw(torch.rand, batch, length, heads)
    state = draw(torch.randn, batch, heads, head_dim, head_dim)
    return q, k, v, beta, log_alpha, state


def _rel_err(x, ref) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm())


def chunk_scan_inputs(inputs, chunk: int, intermediates: torch.dtype | None = None) -> tuple:
    """The inputs ``chunk_delta_rule`` gives ``mmrec::delta_chunk_scan`` for ``inputs``
    (``q, k, v, beta, log_alpha, state``), prepared once."""
    from mmrec.ops.delta_rule.chunk import _chunk_delta_rule
    from mmrec.ops.delta_rule.chunk_scan import delta_chunk_scan

    captured = []

    def capture(*args):
        captured.append(args)
        return delta_chunk_scan(*args)

    with torch.no_grad():
        _chunk_delta_rule(*inputs, chunk, 1.0, intermediates, scan=capture)
    return captured[0]


def _kernel_passes(config: dict | None, inputs, chunk: int, intermediates: torch.dtype | None = None):
    """The chunk scan's Triton launchers alone, on the op inputs ``chunk_delta_rule`` would
    give them: the forward, the adjoint scan of the backward and, with the default config,
    the PyTorch batched products of the gradients that sum over ``V`` (``grads``), the rest
    of the op's backward."""
    from mmrec.ops.delta_rule import chunk_scan_triton as kernels
    from mmrec.ops.delta_rule.chunk_scan import _chunk_gradients

    args = chunk_scan_inputs(inputs, chunk, intermediates)
    w1, w2, q_decayed, _, attn = args[:5]
    grad_o, grad_final = torch.randn_like(w1), torch.randn_like(args[6])

    @functools.cache
    def adjoints():  # (S_n, dO, dU, dS_{n+1}) for the gradients, on the first timed call
        states = kernels.chunk_scan_forward(*args, config=config)[2]
        return (states, grad_o, *kernels.chunk_scan_adjoint(*args[1:6], grad_o, grad_final, config=config)[:2])

    passes = {"fwd": lambda: kernels.chunk_scan_forward(*args, config=config),
              "bwd": lambda: kernels.chunk_scan_adjoint(*args[1:6], grad_o, grad_final, config=config)}
    if config is None:
        passes["grads"] = lambda: _chunk_gradients(w1, w2, q_decayed, attn, *adjoints())
    return passes


def _prepare_passes(config: dict | None, inputs, chunk: int, intermediates: torch.dtype | None = None):
    """The chunk preparation's two Triton launchers alone (``mmrec::delta_chunk_prepare``
    and its backward), on ``chunk_delta_rule``'s inputs."""
    from mmrec.ops.delta_rule import chunk_prepare_triton as kernels

    q, k, v, beta, log_alpha, _ = inputs
    forward = functools.partial(kernels.prepare_forward, q, k, v, beta, log_alpha, chunk, torch.float32, intermediates,
                                config=config)
    outputs = forward()
    grads = tuple(torch.randn_like(x) for x in outputs[:6])
    return {"fwd": forward,
            "bwd": lambda: kernels.prepare_backward(q, k, v, beta, log_alpha, outputs[-1], outputs[4], grads,
                                                          config=config)}


def _fla_function(module: str, name: str, adapt):
    """fla's ``module.name`` called through ``adapt(function, q, k, v, beta, log_alpha,
    state)``, or ``None`` when fla is not installed. An fla that is installed but fails to
    import gives a function that raises its error, so the error is reported in the table
    rather than the baseline silently missing."""
    try:
        function = getattr(__import__(module, fromlist=[name]), name)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "fla":
            return None
        failure = error
    except Exception as error:  # noqa: BLE001 - e.g. a Triton version fla does not accept
        failure = error
    else:
        return functools.partial(adapt, function)

    def refuse(*args):
        raise failure

    return refuse


def fla_baselines() -> dict:
    """fla's kernels with this module's call signature (inputs as :func:`fla_inputs` makes
    them), each ``None`` when fla is not installed:
    - ``chunk_gated_delta_rule``, the same recurrence (``g`` = log α, ``scale`` 1);
    - ``chunk_delta_rule``, the recurrence without the decay (α = 1): less work than ours,
      timed because fla's gated backward refuses Hopper with Triton < 3.7.1 where its
      ungated one runs; its outputs differ from the loop's, so no error is reported."""
    def gated(function, q, k, v, beta, log_alpha, state):
        return function(q=q, k=k, v=v, g=log_alpha, beta=beta, scale=1.0, initial_state=state, output_final_state=True)

    def ungated(function, q, k, v, beta, log_alpha, state):
        return function(q=q, k=k, v=v, beta=beta, scale=1.0, initial_state=state, output_final_state=True)

    return {FLA_GATED: _fla_function("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", gated),
            FLA_UNGATED: _fla_function("fla.ops.delta_rule", "chunk_delta_rule", ungated)}


def fla_inputs(inputs):
    """fla's inputs, cast once outside the timed calls: ``q``, ``k`` and ``β`` in ``v``'s
    dtype (its kernels take them so; some versions refuse float32 ``q``), log α and the
    state in float32."""
    q, k, v, beta, log_alpha, state = inputs
    return q.to(v.dtype), k.to(v.dtype), v, beta.to(v.dtype), log_alpha, state


def bench_once(args, length: int, head_dim: int, precision: str, device: torch.device, gen) -> list[dict]:
    from mmrec.ops.delta_rule import chunk_delta_rule
    from mmrec.ops.delta_rule.chunk import _chunk_delta_rule
    from mmrec.ops.delta_rule.chunk_prepare import chunk_prepare_reference
    from mmrec.ops.delta_rule.chunk_scan import delta_chunk_scan_reference

    torch.set_float32_matmul_precision(precision)
    batch = max(1, args.tokens // length)
    inputs = make_inputs(batch, length, args.heads, head_dim, DTYPES[args.dtype], device, gen)
    probe = (torch.randn(inputs[2].shape, generator=gen, device=device).to(inputs[2].dtype),
             torch.randn(inputs[5].shape, generator=gen, device=device))
    impls = {"op": functools.partial(chunk_delta_rule, chunk_size=args.chunk),
             OP_BF16: functools.partial(chunk_delta_rule, chunk_size=args.chunk, intermediates=torch.bfloat16),
             "loop": functools.partial(_chunk_delta_rule, chunk_size=args.chunk, scale=1.0,
                                       prepare=chunk_prepare_reference, scan=delta_chunk_scan_reference)}
    if not args.bf16_intermediates:
        del impls[OP_BF16]
    if args.compile:
        impls = {name: torch.compile(fn, fullgraph=True) for name, fn in impls.items()}
    if args.baselines:
        impls.update({name: fn for name, fn in fla_baselines().items() if fn is not None})
    # every input's gradient; fla's ungated baseline takes no log α (zeros)
    passes = {name: forward_passes(fn, list(fla_inputs(inputs) if name.startswith("fla") else inputs), lambda _: list(probe))
              for name, fn in impls.items()}
    if args.kernels and device.type == "cuda":
        for intermediates in (None, torch.bfloat16) if args.bf16_intermediates else (None,):
            suffix = ", bf16" if intermediates else ""
            for text in [""] + args.config:
                passes[f"kernel[{text or 'default'}{suffix}]"] = _kernel_passes(parse_config(text) or None, inputs,
                                                                               args.chunk, intermediates)
            for text in [""] + args.prepare_config:
                passes[f"prepare[{text or 'default'}{suffix}]"] = _prepare_passes(parse_config(text) or None, inputs,
                                                                                 args.chunk, intermediates)
    base = {"length": length, "batch": batch, "heads": args.heads, "head_dim": head_dim, "precision": precision}
    qk_dtype = {name: str(inputs[2].dtype if name.startswith("fla") else inputs[0].dtype).removeprefix("torch.")
                for name in passes}
    rows, results = [], {}
    for impl, calls in passes.items():
        for pass_, call in calls.items():

            def measure(call=call, impl=impl, pass_=pass_):
                reset_peak_memory(device)
                try:
                    ms = time_ms(call, device, warmup=args.warmup, repeat=args.repeat)
                except Exception as error:
                    if impl.startswith("fla"):  # a baseline that refuses this device or these shapes
                        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"}
                    if isinstance(error, ValueError) and impl.startswith(("kernel", "prepare")):
                        return {"error": f"refused: {error}"[:160]}  # a launch config the launcher refuses
                    if type(error).__name__ != "OutOfResources":  # a launch config too large for the chip
                        raise
                    return {"error": "out of resources"}
                if not impl.startswith("kernel"):
                    results[impl, pass_] = call()
                return {"ms": ms, "tokens_per_s": batch * length / ms * 1e3, "peak_gib": peak_memory_gib(device)}

            record(rows, {**base, "impl": impl, "pass": pass_, "qk_dtype": qk_dtype[impl]}, measure, device)
    for row in rows:
        mine, loop = results.get((row["impl"], row["pass"])), results.get(("loop", row["pass"]))
        if row["impl"] in SAME_RECURRENCE and mine is not None and loop is not None:
            row["rel_err_vs_loop"] = max(_rel_err(a, b) for a, b in zip(mine, loop))
        if row["impl"] not in ("op", OP_BF16) or "tokens_per_s" not in row:
            continue
        for other, key in (("loop", "over_loop"), (FLA_GATED, "over_fla"), (FLA_UNGATED, "over_fla_ungated")):
            other_row = next((r for r in rows if r["impl"] == other and r["pass"] == row["pass"] and "tokens_per_s" in r), None)
            if other_row:
                row[key] = row["tokens_per_s"] / other_row["tokens_per_s"]
    return rows


def run(args: argparse.Namespace) -> int:
    with keeping_matmul_precision():  # bench_once sets it for each --precision
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    meta = {**run_metadata(), "tokens": args.tokens, "heads": args.heads, "chunk": args.chunk, "dtype": args.dtype,
            "compile": args.compile, "configs": [parse_config(c) for c in args.config],
            "prepare_configs": [parse_config(c) for c in args.prepare_config]}
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for length in args.lengths:
        for head_dim in args.head_dims:
            for precision in args.precision:
                rows.extend(bench_once(args, length, head_dim, precision, device, gen))
                if args.compile:
                    torch._dynamo.reset()

    print(f"\n{meta['device']}, chunk_delta_rule, {args.tokens} tokens x {args.heads} heads, chunk {args.chunk}, "
          f"v in {args.dtype}, compile={args.compile}")
    print(f"{'T':>6} {'batch':>5} {'K=V':>4} {'precision':<8} {'impl':<36} {'pass':<8} {'tok/s':>11} {'ms':>9} "
          f"{'x loop':>7} {'x fla':>6} {'x fla α=1':>9} {'err vs loop':>11} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['length']:>6} {r['batch']:>5} {r['head_dim']:>4} {r['precision']:<8} {r['impl']:<36} {r['pass']:<8} {r['error']}")
            continue
        ratio = f"{r['over_loop']:.2f}x" if "over_loop" in r else "-"
        over_fla = f"{r['over_fla']:.2f}x" if "over_fla" in r else "-"
        over_ungated = f"{r['over_fla_ungated']:.2f}x" if "over_fla_ungated" in r else "-"
        error = f"{r['rel_err_vs_loop']:.1e}" if "rel_err_vs_loop" in r else "-"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        print(f"{r['length']:>6} {r['batch']:>5} {r['head_dim']:>4} {r['precision']:<8} {r['impl']:<36} {r['pass']:<8} "
              f"{r['tokens_per_s']:>11.4g} {r['ms']:>9.3f} {ratio:>7} {over_fla:>6} {over_ungated:>9} {error:>11} {peak:>8}")
    write_json(args.out, {**meta, "results": rows})
    return 0

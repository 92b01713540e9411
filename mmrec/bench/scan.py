"""``python -m mmrec.bench scan``: throughput of ``mmrec::linear_scan`` on the GPU.

Measures, in one run: the device's copy bandwidth (a large device-to-device copy,
counting bytes read plus bytes written), then for each sequence length the op's forward
and forward+backward, the PyTorch composite (the op's CPU implementation run on CUDA
tensors), and ``fla``'s ``chunk_hgrn`` and ``accelerated_scan`` where they import.

Every implementation is charged the same byte floor, the least traffic the computation
needs: forward reads ``a``, ``b`` and writes ``h`` (6 bytes an element in bf16);
backward reads ``a``, ``h``, ``grad_h`` and writes ``grad_a``, ``grad_b`` (10 more). The
effective bandwidth (floor bytes over median time) is reported as a share of the
measured copy bandwidth. Times are ``triton.testing.do_bench`` medians.

For the op's forward + backward through autograd it also reports where the time goes:
the host time to issue one call (Python, autograd, dispatch, launches; measured without
synchronising), the same call replayed as a CUDA graph (GPU time alone), and the two
kernels launched directly. A through-autograd time near the host time and well above
the graph time means the call is CPU-bound.

Tile sweeps of the kernels alone are a development tool: ``python -m tools.scan_sweep``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch

from mmrec.bench.common import do_bench_ms, graph_ms, host_loop_ms, write_json
from mmrec.bench.plot import plot

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "fwd+bwd")


def add_subcommand(commands) -> None:
    parser = commands.add_parser(
        "scan", help="linear_scan op vs copy bandwidth and other scans",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw the results (matplotlib)")
    parser.add_argument("--no-baselines", action="store_true", help="time the op and the copy only")
    parser.set_defaults(run=run)


def copy_bandwidth(nbytes: int = 2**30) -> dict:
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench_ms(lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    moved = 2 * src.numel() * src.element_size()
    return {"ms": ms, "bytes": moved, "GBps": moved / ms / 1e6}


def _baselines(dtype):
    """Other scans, each as (name, prepare(a, b, dh) -> (fwd, fwd+bwd) callables)."""
    from mmrec.ops.linear_scan import (
        linear_scan_backward_composite,
        linear_scan_composite,
    )

    def composite(a, b, dh):
        def fwd():
            return linear_scan_composite(a, b)

        def fwd_bwd():
            h, _ = linear_scan_composite(a, b)
            return linear_scan_backward_composite(a, h, dh, None, None, False, b.dtype)

        return fwd, fwd_bwd

    found = [("torch composite", composite)]
    try:
        from fla.ops.hgrn import chunk_hgrn  # h_t = exp(g_t) h_{t-1} + x_t

        def fla(a, b, dh):
            g = a.float().log().to(dtype).requires_grad_()
            x = b.detach().clone().requires_grad_()
            return (lambda: chunk_hgrn(x.detach(), g.detach())), (
                lambda: torch.autograd.grad(chunk_hgrn(x, g)[0], (x, g), dh))

        found.append(("fla chunk_hgrn", fla))
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        print(f"fla chunk_hgrn not timed: {type(error).__name__}: {error}", file=sys.stderr)
    try:
        from accelerated_scan.scalar import scan as accelerated  # [B, D, T] layout

        def accel(a, b, dh):
            at = a.transpose(1, 2).contiguous().requires_grad_()
            bt = b.transpose(1, 2).contiguous().requires_grad_()
            dht = dh.transpose(1, 2).contiguous()
            return (lambda: accelerated(at.detach(), bt.detach())), (
                lambda: torch.autograd.grad(accelerated(at, bt), (at, bt), dht))

        found.append(("accelerated_scan", accel))
    except Exception as error:  # noqa: BLE001
        print(f"accelerated_scan not timed: {type(error).__name__}: {error}", file=sys.stderr)
    return found


def _rel_err(x, ref) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm())


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("python -m mmrec.bench scan needs a CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    floor = {"fwd": 3 * size, "fwd+bwd": 8 * size}  # bytes per element
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m mmrec.bench " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else shlex.join(sys.argv),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": args.dtype,
    }
    copy = copy_bandwidth()
    print(f"{meta['device']}  copy bandwidth {copy['GBps']:.0f} GB/s (read+write, 1 GiB copy)")
    baselines = [] if args.no_baselines else _baselines(dtype)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)

    def record(impl, pass_, length, ms, **extra):
        elements = args.batch * length * args.dim
        gbps = floor[pass_] * elements / ms / 1e6
        row = {**meta, "impl": impl, "pass": pass_, "batch": args.batch, "length": length, "dim": args.dim,
               "ms": ms, "floor_bytes": floor[pass_] * elements, "GBps": gbps, "pct_of_copy": 100 * gbps / copy["GBps"], **extra}
        rows.append(row)
        return row

    for length in args.lengths:
        _time_length(args, dtype, length, gen, baselines, record)
        torch.cuda.empty_cache()

    for row in rows:  # ratios against each baseline at the same length and pass
        if row["impl"].startswith("mmrec"):
            row["speedup_vs"] = {
                other["impl"]: other["ms"] / row["ms"] for other in rows
                if not other["impl"].startswith("mmrec") and other["length"] == row["length"] and other["pass"] == row["pass"]
            }

    print()
    print(f"batch {args.batch}, dim {args.dim}, {args.dtype}; floor {floor['fwd']} B/element forward, "
          f"{floor['fwd+bwd']} forward+backward; % of copy bandwidth at the floor")
    print(f"{'T':>6} {'pass':<8} {'implementation':<20} {'ms':>9} {'GB/s':>7} {'% copy':>7} {'mmrec speedup':>14}")
    for row in rows:
        mm = next(r for r in rows if r["impl"].startswith("mmrec") and r["length"] == row["length"] and r["pass"] == row["pass"])
        ratio = "" if row is mm else f"{row['ms'] / mm['ms']:.2f}x"
        print(f"{row['length']:>6} {row['pass']:<8} {row['impl']:<20} {row['ms']:>9.3f} {row['GBps']:>7.0f} {row['pct_of_copy']:>6.1f}% {ratio:>14}")
    print("\nforward + backward through autograd, where the time goes (ms; host: issuing one call, "
          "graph: the same call replayed as a CUDA graph)")
    print(f"{'T':>6} {'autograd':>9} {'host':>7} {'graph':>7} {'fwd kernel':>11} {'bwd kernel':>11} {'bwd launch host':>16}")
    for row in rows:
        if row["impl"] == "mmrec linear_scan" and row["pass"] == "fwd+bwd":
            graph = "failed" if row["graph_ms"] is None else f"{row['graph_ms']:.3f}"
            print(f"{row['length']:>6} {row['ms']:>9.3f} {row['host_loop_ms']:>7.3f} {graph:>7} {row['fwd_kernel_ms']:>11.3f} "
                  f"{row['bwd_kernel_ms']:>11.3f} {row['bwd_launch_host_loop_ms']:>16.3f}")
    payload = {**meta, "copy": copy, "results": rows}
    write_json(args.out, payload)
    if args.plot:
        print(f"wrote {plot(payload, args.plot)}")
    return 0


def _time_length(args, dtype, length, gen, baselines, record) -> None:
    from mmrec.ops.linear_scan import linear_scan, linear_scan_composite

    shape = (args.batch, length, args.dim)
    # decays in [0.5, 1) (positive, so fla's log-space gate applies), never zeros
    a = (torch.rand(shape, device="cuda", generator=gen) * 0.5 + 0.5).to(dtype)
    b = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    dh = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    check = _rel_err(linear_scan(a, b)[0], linear_scan_composite(a, b)[0])
    record("mmrec linear_scan", "fwd", length, do_bench_ms(lambda: linear_scan(a, b)), rel_err_vs_composite=check)

    def fwd_bwd():
        return torch.autograd.grad(linear_scan(ar, br)[0], (ar, br), dh)

    record("mmrec linear_scan", "fwd+bwd", length, do_bench_ms(fwd_bwd), **_overhead(a, b, dh, fwd_bwd))
    # log-space gates: same bytes (log a instead of a), exp in registers
    log_a = a.float().log().to(dtype)
    lr = log_a.clone().requires_grad_()
    record("mmrec linear_scan log", "fwd", length, do_bench_ms(lambda: linear_scan(log_a, b, log_space=True)))
    record("mmrec linear_scan log", "fwd+bwd", length,
           do_bench_ms(lambda: torch.autograd.grad(linear_scan(lr, br, log_space=True)[0], (lr, br), dh)))
    for name, prepare in baselines:
        try:
            fwd, fwd_bwd = prepare(a, b, dh)
            record(name, "fwd", length, do_bench_ms(fwd))
            record(name, "fwd+bwd", length, do_bench_ms(fwd_bwd))
        except Exception as error:  # noqa: BLE001 - a baseline failing must not stop the run
            print(f"{name} at T={length} failed: {type(error).__name__}: {error}", file=sys.stderr)
        torch.cuda.empty_cache()


def _overhead(a, b, dh, fwd_bwd) -> dict:
    """Where the op's forward + backward time goes (see the module docstring)."""
    from mmrec.ops import linear_scan_triton as kernels

    h, _ = kernels.scan_forward(a, b)
    return {
        "host_loop_ms": host_loop_ms(fwd_bwd),
        "graph_ms": graph_ms(fwd_bwd),
        "fwd_kernel_ms": do_bench_ms(lambda: kernels.scan_forward(a, b)),
        "bwd_kernel_ms": do_bench_ms(lambda: kernels.scan_backward(a, h, dh, None, None, False, b.dtype)),
        "bwd_launch_host_loop_ms": host_loop_ms(lambda: kernels.scan_backward(a, h, dh, None, None, False, b.dtype)),
    }

"""Tile sweep of the ``linear_scan`` kernels alone (GPU development tool).

    python -m tools.scan_sweep --lengths 32768 --log --tiles 8,8,128,4,stages=3,reread=0 16,4,128,8,reread=0

Times the forward and the backward kernel (launched directly, no autograd) for each tile
at each length, as a share of the device's copy bandwidth at the op's byte floor (as
``python -m mmrec.bench scan`` counts it), with the relative error of ``h`` against the
default tile's. A tile is ``G,R,BLOCK_D,WARPS`` and options ``NAME=N``: ``stages=N``
(Triton's software pipeline instead of the prefetch into registers; with ``reread=0``)
and ``reread=0`` (exclusive prefixes from the rows' own totals): what the library's
kernels (``mmrec/ops/linear_scan_triton.py``) take. The chosen tiles go into their
tables; docs/notes/scan-kernel.md says how they were chosen, and the history the
variants that were dropped (cache hints, the pipelined loop with the re-read).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

OPTIONS = {"stages": "STAGES", "reread": "REREAD"}
# (G, R, BLOCK_D, num_warps): the tiles timed without --tiles
DEFAULT_TILES = [
    (32, 4, 64, 8), (16, 4, 64, 4), (32, 2, 64, 8), (64, 2, 64, 8), (16, 4, 64, 2), (32, 4, 64, 4),
    (16, 2, 64, 4), (64, 4, 64, 16), (32, 4, 32, 4), (64, 4, 32, 8), (16, 8, 64, 4), (32, 2, 64, 4),
]


def parse_tile(text: str) -> tuple:
    """``"16,4,64,4,stages=3,reread=0"`` -> ``(16, 4, 64, 4, (("STAGES", 3), ("REREAD", 0)))``."""
    fields = text.split(",")
    if len(fields) < 4 or not all(f.strip().isdigit() for f in fields[:4]):
        raise SystemExit(f"--tiles {text!r}: a tile is G,R,BLOCK_D,WARPS[,OPTION=N...]")
    options = []
    for field in fields[4:]:
        name, _, value = field.partition("=")
        if name not in OPTIONS or not value.strip().isdigit():
            raise SystemExit(f"--tiles {text!r}: options are {', '.join(f'{k}=N' for k in OPTIONS)}")
        options.append((OPTIONS[name], int(value)))
    return (*(int(x) for x in fields[:4]), tuple(options))


def tile_config(tile: tuple) -> dict:
    """A parsed tile as the launchers' ``config``."""
    groups, steps, block_d, warps, options = tile
    return {"G": groups, "R": steps, "BLOCK_D": block_d, "num_warps": warps, **dict(options)}


def _time_tile(kernels, a, b, dh, dtype, cfg, log_space) -> tuple[float, float, torch.Tensor]:
    from mmrec.bench.common import do_bench_ms as _bench

    h, _ = kernels.scan_forward(a, b, log_space=log_space, config=cfg)
    fwd = _bench(lambda: kernels.scan_forward(a, b, log_space=log_space, config=cfg))
    bwd = _bench(lambda: kernels.scan_backward(a, h, dh, None, None, False, dtype, log_space=log_space, config=cfg))
    return fwd, bwd, h


def sweep_length(args, dtype, copy_gbps, length, log_space, tiles) -> list[dict]:
    from mmrec.bench.scan import _rel_err
    from mmrec.ops import linear_scan_triton as kernels

    shape = (args.batch, length, args.dim)
    gen = torch.Generator(device="cuda").manual_seed(1)
    a = (torch.rand(shape, device="cuda", generator=gen) * 0.5 + 0.5).to(dtype)
    if log_space:
        a = a.float().log().to(dtype)
    b = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    dh = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    ref, _ = kernels.scan_forward(a, b, log_space=log_space)
    size = a.element_size()
    floor = {"fwd": 3 * size * a.numel(), "bwd": 5 * size * a.numel()}  # bytes
    defaults = {kind: kernels._pick_config(kind, log_space, a.device, dtype, *shape, None) for kind in ("fwd", "bwd")}
    print(f"\ntile sweep at T={length}{' (log space)' if log_space else ''}; the library's tiles here: "
          f"fwd {defaults['fwd']}, bwd {defaults['bwd']}")
    rows = []
    for tile in tiles:
        cfg = tile_config(tile)
        label = "".join(f" {name.lower()}={value}" for name, value in tile[4])
        try:
            fwd, bwd, h = _time_tile(kernels, a, b, dh, dtype, cfg, log_space)
            err = _rel_err(h, ref)
        except Exception as error:  # noqa: BLE001 - report the tile and go on
            print(f"  {cfg}: failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        row = {"length": length, "log_space": log_space, "config": cfg,
               "fwd_ms": fwd, "bwd_ms": bwd, "rel_err": err,
               "fwd_pct_of_copy": 100 * floor["fwd"] / fwd / 1e6 / copy_gbps,
               "bwd_pct_of_copy": 100 * floor["bwd"] / bwd / 1e6 / copy_gbps}
        rows.append(row)
        print(f"  G={cfg['G']:<3} R={cfg['R']} BLOCK_D={cfg['BLOCK_D']:<3} warps={cfg['num_warps']}{label}: "
              f"fwd {fwd:.3f} ms ({row['fwd_pct_of_copy']:.1f}%)  bwd {bwd:.3f} ms ({row['bwd_pct_of_copy']:.1f}%)  err {err:.1e}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.scan_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--tiles", nargs="+", type=parse_tile, default=[], metavar="G,R,BLOCK_D,WARPS[,OPTION=N...]",
                        help="the tiles to time (default: a built-in list of 64-channel tiles)")
    parser.add_argument("--log", action="store_true", help="also with log-space gates")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m tools.scan_sweep needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from mmrec.bench.common import run_metadata, write_json
    from mmrec.bench.scan import DTYPES, copy_bandwidth

    dtype = DTYPES[args.dtype]
    tiles = list(dict.fromkeys(args.tiles or [(*tile, ()) for tile in DEFAULT_TILES]))
    meta = {**run_metadata(), "command": "python -m tools.scan_sweep " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "triton": triton.__version__, "dtype": args.dtype, "batch": args.batch, "dim": args.dim}
    copy = copy_bandwidth()
    print(f"{meta['device']}  copy bandwidth {copy['GBps']:.0f} GB/s (read+write, 1 GiB copy); "
          f"% of copy at the byte floor (forward 6, backward 10 B/element in 2-byte dtypes)")
    rows = []
    for length in args.lengths:
        for log_space in (False, True) if args.log else (False,):
            rows += sweep_length(args, dtype, copy["GBps"], length, log_space, tiles)
            torch.cuda.empty_cache()
    write_json(args.out, {**meta, "copy": copy, "sweep": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

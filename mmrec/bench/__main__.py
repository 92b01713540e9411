"""``python -m mmrec.bench``: one subcommand per benchmark; each prints a table and can
write its figures as JSON (``--out``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmrec.bench import block, decode, delta, gated_rnn, host, model, plot, quality, recall, recurrence, scale, scan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmrec.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (scan, block, model, decode, gated_rnn, delta, host, recurrence, quality, scale, recall, plot):  # each registers its subcommand
        module.add_subcommand(commands)
    everything = commands.add_parser("all", help="scan, block, model, decode and gated-rnn with their defaults")
    everything.add_argument("--out-dir", type=Path, help="write each benchmark's JSON here")
    everything.set_defaults(run=run_all)
    return parser


def run_all(args: argparse.Namespace) -> int:
    """Each GPU benchmark with its defaults, one after the other (quality and scale need
    --data, and recall trains models for minutes: run them alone)."""
    parser = build_parser()
    status = 0
    for name in ("scan", "block", "model", "decode", "gated-rnn"):
        argv = [name] + (["--out", str(args.out_dir / f"{name}.json")] if args.out_dir else [])
        sub = parser.parse_args(argv)
        status |= sub.run(sub)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

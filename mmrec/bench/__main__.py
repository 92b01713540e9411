"""``python -m mmrec.bench``: one subcommand per benchmark; each prints a table and can
write its figures as JSON (``--out``)."""

from __future__ import annotations

import argparse
import sys

from mmrec.bench import scan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmrec.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # One module per benchmark registers its subcommand; `block`, `model`, `decode` and
    # `all` are to come.
    scan.add_subcommand(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

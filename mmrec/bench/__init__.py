"""Benchmarks run on a GPU: ``python -m mmrec.bench SUBCOMMAND`` (see ``--help``)."""

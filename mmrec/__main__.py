"""``python -m mmrec list`` shows registered variants; ``python -m mmrec schema`` prints the recipe schema."""

from __future__ import annotations

import argparse
import json
import sys

from mmrec import recipes, registry


SELECTED_BY = {"layers": "model.arch", "recurrences": "model.recurrence.kind", "memories": "model.memory.kind"}


def list_registered() -> None:
    """What a recipe can select, by entry-point group; the layers that are only building
    blocks of those (no ``arch``) on one line of their own."""
    for group in registry.GROUPS:
        selectable, parts = [], []
        for name, entry in sorted(registry.entries(group).items()):
            config = getattr(entry.target, "Config", None)
            is_model = group != "layers" or "arch" in getattr(config, "model_fields", {})
            (selectable if is_model else parts).append((name, entry))
        print(f"mmrec.{group} ({SELECTED_BY[group]}):")
        for name, entry in selectable:
            print(f"  {name:<20} {entry.package:<20} {entry.value}")
        if parts:
            print(f"  building blocks of the above, not selected by a recipe: {', '.join(name for name, _ in parts)}")
    print("recipes:")
    print("  " + ", ".join(recipes.names()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmrec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="registered layers, recurrences and memories, with the package that gave each")
    schema = commands.add_parser("schema", help="the recipe JSON schema (includes installed plugins)")
    schema.add_argument("--out", help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    if args.command == "list":
        list_registered()
    else:
        text = json.dumps(recipes.schema(), indent=2)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
            print(f"wrote the recipe schema to {args.out}")
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

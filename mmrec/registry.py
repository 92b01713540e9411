"""Named variants from Python entry points.

Three entry-point groups make up the public extension API: ``mmrec.layers`` (layer and
block classes), ``mmrec.scans`` (recurrence variants) and ``mmrec.memories`` (long-term
memory variants). The built-ins register through this package's own ``pyproject.toml``
exactly as a third-party plugin would. A plugin that fails to import is reported with a
warning and skipped; everything else still loads.
"""

from __future__ import annotations

import difflib
import functools
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

GROUPS = ("layers", "scans", "memories")
NOUNS = {"layers": "layer", "scans": "scan", "memories": "memory"}

# Variants that known plugin packages provide, so that a recipe naming one while the
# package is missing says what to install. Add yours with a pull request.
KNOWN_PLUGINS = {
    ("memories", "fifo"): "mmrec-fifo-memory",
    ("scans", "complex"): "mmrec-complex-scan",
}


class UnknownNameError(KeyError):
    """A variant name that no installed package registers."""

    def __init__(self, group: str, name: str, known: list[str]):
        self.group, self.name, self.known = group, name, known
        super().__init__(unknown_name_message(NOUNS[group], name, known, KNOWN_PLUGINS.get((group, name))))

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Entry:
    name: str
    group: str
    target: Any
    package: str  # the distribution that registered it
    value: str  # "module:attr"


def closest(name: str, known: list[str]) -> str | None:
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return match[0] if match else None


def unknown_name_message(noun: str, name: str, known: list[str], package: str | None = None) -> str:
    """``unknown scan 'paralel'; registered: exact, parallel; did you mean 'parallel'?``"""
    message = f"unknown {noun} {name!r}; registered: {', '.join(sorted(known)) or '(none)'}"
    if package:
        return message + f"; {name!r} comes from the plugin package {package!r}, which is not installed (it lives in plugins/{package} of the mmrec repository)"
    suggestion = closest(name, known)
    return message + (f"; did you mean {suggestion!r}?" if suggestion else "")


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown registry group {group!r}; groups: {', '.join(GROUPS)}")


@functools.cache
def entries(group: str) -> dict[str, Entry]:
    """Every loadable entry of ``mmrec.<group>``, by name (cached; see :func:`refresh`)."""
    _check_group(group)
    found: dict[str, Entry] = {}
    for ep in entry_points(group=f"mmrec.{group}"):
        package = ep.dist.name if ep.dist is not None else "?"
        if ep.name in found:
            first = found[ep.name]
            if first.value == ep.value:  # the same package seen twice on sys.path
                continue
            warnings.warn(
                f"mmrec: {group} name {ep.name!r} from package {package!r} ({ep.value}) is already "
                f"registered by {first.package!r} ({first.value}); keeping the first",
                stacklevel=2,
            )
            continue
        try:
            target = ep.load()
        except Exception as error:  # a broken plugin must not take the built-ins down
            warnings.warn(f"mmrec: plugin {package!r} failed to load {group} entry {ep.name!r} ({ep.value}): {error!r}", stacklevel=2)
            continue
        found[ep.name] = Entry(ep.name, group, target, package, ep.value)
    return found


def refresh() -> None:
    """Forget cached entry points, e.g. after installing a plugin in this process."""
    entries.cache_clear()


def names(group: str) -> list[str]:
    """Registered names of ``group`` ("layers", "scans" or "memories"), sorted."""
    return sorted(entries(group))


def get(group: str, name: str) -> Any:
    """The object registered as ``name`` in ``group``; unknown names list what exists."""
    found = entries(group)
    if name not in found:
        raise UnknownNameError(group, name, list(found))
    return found[name].target

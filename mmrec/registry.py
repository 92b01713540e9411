"""Named variants from Python entry points.

Three entry-point groups make up the public extension API: ``mmrec.layers`` (layer and
block classes), ``mmrec.recurrences`` (recurrence variants) and ``mmrec.memories``
(long-term memory variants). The built-ins register through this package's own
``pyproject.toml`` exactly as a third-party plugin would. ``mmrec.scans``, the recurrences'
group before it was renamed, is still read, with a ``DeprecationWarning`` naming each
plugin that uses it; ``"scans"`` as a group name in this module's functions means
``"recurrences"``, with the same warning.

Rules (see :func:`entries`):

- mmrec's own entries always win: a plugin that registers a name mmrec already has
  (say a memory ``hds``) is skipped with a warning naming both packages, wherever the
  plugin sits on ``sys.path``.
- Between two plugins that register the same name, the one whose distribution name sorts
  first (case-insensitively) is kept and the other is skipped with a warning naming both;
  the rule does not depend on ``sys.path`` or install order.
- A plugin that fails to import, including one that raises ``SystemExit`` (e.g. calls
  ``sys.exit()``) at import, is reported with a warning naming it and skipped; everything
  else still loads, and asking for a name that only it registers says why it is missing.
  ``KeyboardInterrupt`` is not caught: Ctrl-C during an import must still stop the program.
"""

from __future__ import annotations

import difflib
import functools
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

GROUPS = ("layers", "recurrences", "memories")
NOUNS = {"layers": "layer", "recurrences": "recurrence", "memories": "memory"}
RENAMED_GROUPS = {"scans": "recurrences"}  # old name -> new: still read, with a DeprecationWarning

# Variants that known plugin packages provide, so that a recipe naming one while the
# package is missing says what to install. Add yours with a pull request.
KNOWN_PLUGINS = {
    ("memories", "fifo"): "mmrec-fifo-memory",
    ("recurrences", "complex"): "mmrec-complex-scan",
}


BUILTIN_PACKAGE = "mmrec"

# (group, name) -> why the entries registering it could not be loaded; filled by entries()
_load_failures: dict[tuple[str, str], list[str]] = {}



class UnknownNameError(KeyError):
    """A variant name that no installed package registers (or whose package failed to load)."""

    def __init__(self, group: str, name: str, known: list[str]):
        self.group, self.name, self.known = group, name, known
        super().__init__(unknown_name_message(group, NOUNS[group], name, known, KNOWN_PLUGINS.get((group, name))))

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


def load_failures(group: str, name: str) -> list[str]:
    """Why the entries that register ``name`` in ``group`` failed to load (empty if none did)."""
    group = _check_group(group)
    entries(group)  # discovery fills the record
    return list(_load_failures.get((group, name), []))


def unknown_name_message(group: str, noun: str, name: str, known: list[str], package: str | None = None) -> str:
    """``unknown recurrence 'paralel'; registered: exact, parallel; did you mean 'parallel'?``
    (``noun`` names what ``group`` holds). When a plugin registers ``name`` in ``group`` but
    failed to load, the message says so instead."""
    message = f"unknown {noun} {name!r}; registered: {', '.join(sorted(known)) or '(none)'}"
    failures = load_failures(group, name)
    if failures:
        return message + f"; {name!r} is registered by " + "; and by ".join(failures) + ", so it is unavailable (fix or reinstall that package)"
    if package:
        return message + f"; {name!r} comes from the plugin package {package!r}, which is not installed (it lives in plugins/{package} of the mmrec repository)"
    suggestion = closest(name, known)
    return message + (f"; did you mean {suggestion!r}?" if suggestion else "")


def _check_group(group: str) -> str:
    """``group``, its old name mapped to the new one (with a ``DeprecationWarning``)."""
    if group in RENAMED_GROUPS:
        warnings.warn(f"mmrec: the registry group {group!r} is now {RENAMED_GROUPS[group]!r}", DeprecationWarning,
                      stacklevel=3)
        return RENAMED_GROUPS[group]
    if group not in GROUPS:
        raise ValueError(f"unknown registry group {group!r}; groups: {', '.join(GROUPS)}")
    return group


def _entry_points(group: str) -> list:
    """The entry points of ``mmrec.<group>`` and of its old name, each plugin still on the
    old name warned about."""
    found = list(entry_points(group=f"mmrec.{group}"))
    for old in (old for old, new in RENAMED_GROUPS.items() if new == group):
        for ep in entry_points(group=f"mmrec.{old}"):
            warnings.warn(f"mmrec: package {_package(ep)!r} registers {ep.name!r} under the entry-point group "
                          f"'mmrec.{old}', now 'mmrec.{group}': rename the group in its pyproject.toml",
                          DeprecationWarning, stacklevel=3)
            found.append(ep)
    return found


def _package(ep) -> str:
    return ep.dist.name if getattr(ep, "dist", None) is not None else "?"


def _is_builtin(package: str) -> bool:
    return package.lower().replace("_", "-") == BUILTIN_PACKAGE


def _precedence(ep) -> tuple:
    """mmrec's own entries first, then plugins by distribution name, so that which of two
    same-named entries wins does not depend on ``sys.path`` order (a stable sort: one
    package's entries keep their declared order)."""
    package = _package(ep)
    return (not _is_builtin(package), package.lower())


def entries(group: str) -> dict[str, Entry]:
    """Every loadable entry of ``mmrec.<group>``, by name (cached; see :func:`refresh`).

    Of several entries with one name, mmrec's own wins over any plugin's, and among
    plugins the distribution name that sorts first wins; each one skipped is reported with
    a warning naming both packages. An entry that fails to load (any ``Exception``, or
    ``SystemExit`` from a plugin that calls ``sys.exit()`` at import) is skipped with a
    warning, and the next entry of the same name, if any, is tried."""
    return _entries(_check_group(group))


@functools.cache
def _entries(group: str) -> dict[str, Entry]:
    for key in [key for key in _load_failures if key[0] == group]:
        del _load_failures[key]
    found: dict[str, Entry] = {}
    for ep in sorted(_entry_points(group), key=_precedence):
        package = _package(ep)
        if ep.name in found:
            first = found[ep.name]
            if first.value == ep.value:  # the same package seen twice on sys.path
                continue
            why = ("mmrec's own entries take precedence over plugins" if _is_builtin(first.package)
                   else "of two plugins, the package whose name sorts first is kept")
            warnings.warn(
                f"mmrec: {group} name {ep.name!r} from package {package!r} ({ep.value}) is already "
                f"registered by {first.package!r} ({first.value}); skipping the one from {package!r} "
                f"({why}; rename the variant in {package!r} to use both)",
                stacklevel=2,
            )
            continue
        try:
            target = ep.load()
        except (Exception, SystemExit) as error:  # noqa: BLE001
            # A broken plugin must not take the built-ins (or `import mmrec`) down; a plugin
            # calling sys.exit() at import raises SystemExit, which is no reason to end the
            # program. KeyboardInterrupt is left alone, so that Ctrl-C still stops it.
            what = f"SystemExit({error.code!r}) (it called sys.exit() at import)" if isinstance(error, SystemExit) else repr(error)
            warnings.warn(f"mmrec: plugin {package!r} failed to load {group} entry {ep.name!r} ({ep.value}): {what}; skipping it", stacklevel=2)
            _load_failures.setdefault((group, ep.name), []).append(f"the package {package!r} ({ep.value}), which failed to load: {what}")
            continue
        found[ep.name] = Entry(ep.name, group, target, package, ep.value)
    for name in [name for (g, name) in _load_failures if g == group and name in found]:
        del _load_failures[(group, name)]  # another package provides it after all
    return found


def refresh() -> None:
    """Forget cached entry points, e.g. after installing a plugin in this process."""
    _entries.cache_clear()
    _load_failures.clear()


def names(group: str) -> list[str]:
    """Registered names of ``group`` ("layers", "recurrences" or "memories"), sorted."""
    return sorted(entries(group))


def get(group: str, name: str) -> Any:
    """The object registered as ``name`` in ``group``; unknown names list what exists."""
    group = _check_group(group)
    found = entries(group)
    if name not in found:
        raise UnknownNameError(group, name, list(found))
    return found[name].target

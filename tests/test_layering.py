"""The package's import graph runs one way: layers and ops never reach the model, the
recipes (the trainer) or the benchmarks; the library never reaches the benchmarks or the
repository's tools/.

The graph is read from the source with ``ast`` (nothing is imported), every import
statement counted, those inside functions and ``TYPE_CHECKING`` blocks too, and followed
transitively inside the package. Importing a submodule counts as importing that module,
not its parent package's ``__init__`` (which Python also runs): otherwise every module
would reach everything the top-level ``mmrec/__init__.py`` gathers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmrec"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package``."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """What ``name`` imports: modules of the package where a name resolves to one (``from
    mmrec import registry`` is ``mmrec.registry``), else the dotted name as written."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1 packages
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module -> everything it imports, directly or through other modules of the
    package (names outside the package are kept but not followed)."""
    modules = module_files(package)
    direct = {name: imported_names(name, path, modules) for name, path in modules.items()}
    reach = {}
    for name in modules:
        seen, todo = set(), [name]
        while todo:
            for target in direct.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        reach[name] = seen
    return reach


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, targets in sorted(graph.items()):
        if under(name, "mmrec.layers", "mmrec.ops"):
            banned = ("mmrec.model", "mmrec.recipes", "mmrec.bench", "tools")
            # the top-level package gathers the model and the recipes
            found += [f"{name} -> {t}" for t in sorted(targets) if under(t, *banned) or t == "mmrec"]
        elif not under(name, "mmrec.bench"):
            found += [f"{name} -> {t}" for t in sorted(targets) if under(t, "mmrec.bench", "tools")]
    return found


def test_the_import_graph_runs_one_way():
    graph = import_graph(PACKAGE)
    # the graph is read, not empty: known edges are there
    assert "mmrec.ops.linear_scan" in graph["mmrec.layers.parallel_recurrence"]
    assert "mmrec.layers.norm" in graph["mmrec.model"] and "mmrec.bench.scan" in graph["mmrec.bench.__main__"]
    assert len(graph) > 50
    assert violations(graph) == []


def test_the_checker_finds_violations(tmp_path):
    """A made-up package with one violation of each kind, through relative, lazy and
    transitive imports, and an allowed one (a benchmark importing the model)."""
    files = {
        "mmrec/__init__.py": "from mmrec import model\n",
        "mmrec/model.py": "from mmrec.layers import attention\n",
        "mmrec/layers/__init__.py": "",
        "mmrec/layers/attention.py": "from . import helper\n",
        "mmrec/layers/helper.py": "def f():\n    from ..recipes import train\n",
        "mmrec/layers/uses_root.py": "import mmrec\n",
        "mmrec/ops/__init__.py": "",
        "mmrec/ops/scan.py": "import tools.scan_sweep\n",
        "mmrec/recipes/__init__.py": "",
        "mmrec/recipes/train.py": "from mmrec.bench.common import run_metadata\n",
        "mmrec/bench/__init__.py": "",
        "mmrec/bench/common.py": "import mmrec.model\nfrom tools import anything\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = violations(import_graph(tmp_path / "mmrec"))
    assert "mmrec.layers.helper -> mmrec.recipes.train" in found
    assert "mmrec.layers.attention -> mmrec.bench.common" in found  # through helper and train
    assert "mmrec.layers.uses_root -> mmrec.model" in found and "mmrec.layers.uses_root -> mmrec" in found
    assert "mmrec.ops.scan -> tools.scan_sweep" in found
    assert "mmrec.recipes.train -> mmrec.bench.common" in found and "mmrec.recipes.train -> tools" in found
    assert "mmrec.model -> mmrec.bench.common" in found
    assert not any(v.startswith("mmrec.bench") for v in found)

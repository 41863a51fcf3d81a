"""Layers point down: no import cycle between meshlib's modules, nor between its packages.

Read from the source with ``ast``, so an import inside a function or under
``TYPE_CHECKING`` counts as much as one at the top: a late import hides a cycle from
Python, not from a reader. A package is a folder under ``meshlib/`` (``meshlib.routing``);
a module at the top (``meshlib._config``) is a unit of its own.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import meshlib

ROOT = Path(meshlib.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The meshlib modules ``name`` imports (a package's ``__init__`` for ``from . import``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    named: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            named += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                head = ".".join([*base, *([node.module] if node.module else [])])
            else:
                head = node.module or ""
            named += [head, *(f"{head}.{alias.name}" for alias in node.names)]
    found = set()
    for target in named:
        while target and target not in known:  # a name inside a module: the module
            target = target.rpartition(".")[0]
        if target.startswith("meshlib.") and target != name:
            found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    assert len(graph) > 100  # the whole package was read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_package_imports_itself_back() -> None:
    units: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        units.setdefault(_unit(module), set()).update(
            _unit(t) for t in targets if _unit(t) != _unit(module)
        )
    assert "meshlib.discovery" in units
    assert _cycle(units) is None, " -> ".join(_cycle(units) or [])


def test_the_check_sees_a_late_import_cycle(tmp_path: Path) -> None:
    """The reader itself can fail: a cycle through a function-level import is found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from meshlib.b import x\n")
    b.write_text("def f():\n    from meshlib.a import y\n")
    known = {"meshlib.a": a, "meshlib.b": b}
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert graph == {"meshlib.a": {"meshlib.b"}, "meshlib.b": {"meshlib.a"}}
    assert _cycle(graph) is not None

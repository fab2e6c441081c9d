"""The package's shape (design notes, modules): no import cycle between modules and no private name
imported across modules."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cmdtool"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The cmdtool modules ``path`` imports with relative imports (``from .x import y``)."""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    found = set()
    for dots, name in re.findall(r"^\s*from (\.+)([\w.]*) import", path.read_text(), re.M):
        base = package[:len(package) - (len(dots) - 1)]
        found.add(".".join(base + ([name] if name else [])))
    return found


def test_no_import_cycle_between_top_level_modules():
    def top(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "cmdtool"

    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        graph.setdefault(top(_module(path)), set()).update(top(m) for m in _imports(path))
    for node in graph:
        graph[node].discard(node)
    graph["cmdtool"] = set()  # the package's own __init__ re-exports; modules never import it
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        visiting.add(node)
        for nxt in graph.get(node, ()):
            assert nxt not in visiting, f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in done:
                visit(nxt, path + [nxt])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    assert {"fitting", "modes", "modefile", "online", "pipeline"} <= set(graph)
    assert "pipeline" not in graph["online"] and "online" in graph["pipeline"]


def test_no_private_name_is_imported_across_modules():
    offenders = [f"{path.relative_to(PACKAGE.parent)}: {line.strip()}" for path in PACKAGE.rglob("*.py")
                 for line in path.read_text().splitlines() if re.match(r"\s*from \.+ import _", line)
                 or re.match(r"\s*from \.+[\w.]+ import .*\b_[a-z]\w*", line)]
    assert offenders == []

"""The package's shape (DESIGN "Module map", STYLE "Modules by concept, shallow"): the module-level
imports inside cmdtool form no cycle and no chain longer than ``MAX_CHAIN`` modules; no private name
is imported across modules; importing cmdtool installs no signal handler and loads no submodule."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cmdtool"
MAX_CHAIN = 10  # modules in the longest chain of module-level imports (a imports b imports c ... )


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(module: str, target: str, level: int) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[:len(package.split(".")) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: at the top level, also inside
    ``try`` and ``if`` blocks, but not under ``if TYPE_CHECKING`` and not inside functions."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            pending += node.orelse if "TYPE_CHECKING" in ast.unparse(node.test) else node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody
    return found


def _lazy_exports(module: str) -> dict[str, str]:
    """A lazy package's ``lazy_package(__name__, {".module": ("name", ...)})``: name -> absolute module."""
    exports = {}
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "lazy_package":
            for key, names in zip(node.args[1].keys, node.args[1].values):
                dots = len(key.value) - len(key.value.lstrip("."))
                target = _resolve(module, key.value[dots:], dots)
                exports.update({ast.literal_eval(name): target for name in names.elts})
    return exports


def _imports(module: str) -> set[str]:
    """The cmdtool modules that importing ``module`` runs directly: each module named by a
    module-level import, the packages above it (their ``__init__`` runs first) and, for a name
    taken from a lazy package, the module that defines it (its first use imports that module)."""
    found = set()
    for node in _module_level_imports(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            source = _resolve(module, node.module or "", node.level)
            targets = [source]
            exports = _lazy_exports(source) if source in MODULES else {}
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    targets.append(f"{source}.{alias.name}")
                elif alias.name in exports:
                    targets.append(exports[alias.name])
        for target in targets:
            parts = target.split(".")
            for depth in range(2, len(parts) + 1):  # the packages above, then the module itself
                name = ".".join(parts[:depth])
                already_running = module == name or module.startswith(name + ".")  # importing module's own packages
                if name in MODULES and not already_running:
                    found.add(name)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _longest_chains() -> dict[str, list[str]]:
    """The longest import chain from each module; asserts there is no cycle."""
    longest: dict[str, list[str]] = {}

    def visit(module: str, path: list[str]) -> list[str]:
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        if module not in longest:
            chains = [visit(nxt, path + [module]) for nxt in sorted(GRAPH[module])]
            longest[module] = [module] + max(chains, key=len, default=[])
        return longest[module]

    for module in sorted(GRAPH):
        visit(module, [])
    return longest


def test_the_import_graph_is_read_as_python_runs_it():
    """The graph the bounds below are checked on: packages above a module run first, a name from a
    lazy package loads the module that defines it, imports inside functions do not count."""
    assert "cmdtool.checkpoints.schema" in GRAPH["cmdtool.modes"]  # through the lazy checkpoints package
    assert "cmdtool.checkpoints" in GRAPH["cmdtool.modes"]  # whose __init__ runs first
    assert "cmdtool.online.state" in GRAPH["cmdtool.training.state"]
    assert "cmdtool.online" in GRAPH["cmdtool.training.state"]
    assert "cmdtool.report" not in GRAPH["cmdtool.cli"]  # imported inside the report command
    assert GRAPH["cmdtool.checkpoints"] == {"cmdtool._lazy"}
    assert GRAPH["cmdtool.errors"] == set()


def test_no_import_cycle_and_no_chain_longer_than_the_bound():
    chains = _longest_chains()
    deepest = max(chains.values(), key=len)
    assert len(deepest) <= MAX_CHAIN, f"{len(deepest)} modules: {' -> '.join(deepest)}"
    assert len(chains["cmdtool"]) <= 3  # the package itself imports almost nothing up front


def test_no_private_name_is_imported_across_modules():
    offenders = [f"{path.relative_to(PACKAGE.parent)}: {line.strip()}" for path in PACKAGE.rglob("*.py")
                 for line in path.read_text().splitlines() if re.match(r"\s*from \.+ import _", line)
                 or re.match(r"\s*from \.+[\w.]+ import .*\b_[a-z]\w*", line)]
    assert offenders == []


def test_importing_cmdtool_installs_no_signal_handler_and_loads_no_submodule():
    code = ("import signal, sys; sys.argv[0] = 'cmd'; import cmdtool; "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler; "
            "loaded = sorted(m for m in sys.modules if m.startswith('cmdtool.')); print(loaded); "
            "assert 'numpy' not in sys.modules and 'h5py' not in sys.modules; "
            "assert cmdtool.CMD.__module__ == 'cmdtool.estimator' and 'cmdtool.estimator' in sys.modules; "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['cmdtool._lazy', 'cmdtool.errors', 'cmdtool.version']"


def test_a_lazy_package_keeps_its_functions_over_submodules_of_the_same_name():
    """``cmdtool.online.update`` (a function and a module), ``cmdtool.checkpoints.discover``,
    ``cmdtool.reconstruct``: the function, whichever was imported first."""
    code = ("import cmdtool.online.update, cmdtool.online.watch, cmdtool.checkpoints.discover, cmdtool.reconstruct; "
            "import cmdtool, cmdtool.online as online, cmdtool.checkpoints as checkpoints; "
            "from cmdtool.online import update; "
            "assert callable(update) and update.__module__ == 'cmdtool.online.update'; "
            "assert online.watch.__module__ == 'cmdtool.online.watch' and callable(online.watch); "
            "assert callable(checkpoints.discover) and callable(cmdtool.reconstruct); "
            "assert cmdtool.reconstruct.__module__ == 'cmdtool.pipeline'; "
            "assert sorted(set(cmdtool.__all__) - set(dir(cmdtool))) == []")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent, check=False)
    assert result.returncode == 0, result.stderr


def test_every_exported_name_exists():
    import importlib

    for module in (m for m, path in MODULES.items() if path.name == "__init__.py"):
        package = importlib.import_module(module)
        for name in getattr(package, "__all__", []):
            assert getattr(package, name) is not None, f"{module}.{name}"
        for name in _lazy_exports(module):
            assert getattr(package, name) is not None, f"{module}.{name}"


def test_the_package_names_its_lazy_exports_for_readers_of_the_code():
    """``cmdtool/__init__.py`` imports under ``TYPE_CHECKING`` exactly what it loads on first use."""
    tree = ast.parse(MODULES["cmdtool"].read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
    named = {alias.name: _resolve("cmdtool", node.module, node.level) for node in block.body for alias in node.names}
    assert named == _lazy_exports("cmdtool")

"""The packages import one another one way only, and the runtime never imports the scaffolding.

Read from the source with `ast`, so that an import inside a function counts as much as one
at the top of a module: it only runs later. Imports under `if TYPE_CHECKING:` do not count,
since they never run. A layer is a subpackage of `multillm` (`multillm.cli`) or one top-level
module (`multillm.config`); the `multillm` package's own `__init__` is the layer `multillm`.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import multillm

ROOT = Path(multillm.__file__).parent

# What runs in production: none of it may reach the CLI, the benchmark or the scaffolding.
RUNTIME = ("multillm.workers", "multillm.producers", "multillm.sinks", "multillm.providers")
OFF_THE_RUNTIME_PATH = ("multillm.cli", "multillm.bench", "multillm.testbed")

# layer -> imported layer -> where ("multillm/cli/commands.py:12")
Graph = dict[str, dict[str, list[str]]]


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """`multillm.cli.commands` -> `multillm.cli`; `multillm.config` -> itself; `multillm` -> itself."""
    return ".".join(module.split(".")[:2])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node` but the bodies of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.orelse:
                yield branch
                yield from _runtime_nodes(branch)
            continue
        yield child
        yield from _runtime_nodes(child)


def imported_modules(root: Path, path: Path) -> Iterator[tuple[str, int]]:
    """(module, line) of every import of a `multillm` module in the file at `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(root, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..sinks import y`
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # `from multillm import contract` imports the module multillm.contract.
                candidate = root.parent.joinpath(*f"{base}.{alias.name}".split("."))
                is_module = candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()
                yield (f"{base}.{alias.name}" if is_module else base), node.lineno


def import_graph(root: Path = ROOT) -> Graph:
    """Which layer imports which, from every module under `root` (a `multillm` package folder)."""
    graph: Graph = {}
    for path in sorted(root.rglob("*.py")):
        source = layer_of(module_name(root, path))
        edges = graph.setdefault(source, {})
        for module, line in imported_modules(root, path):
            target = layer_of(module)
            where = f"{path.relative_to(root.parent)}:{line}"
            if target.split(".")[0] == root.name and target != source and where not in edges.get(target, ()):
                edges.setdefault(target, []).append(where)
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of layers, first layer repeated at the end, or None."""
    done: set[str] = set()

    def visit(layer: str, trail: list[str]) -> list[str] | None:
        if layer in trail:
            return [*trail[trail.index(layer) :], layer]
        if layer in done:
            return None
        for target in sorted(graph.get(layer, {})):
            cycle = visit(target, [*trail, layer])
            if cycle:
                return cycle
        done.add(layer)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def reachable(graph: Graph, start: str) -> dict[str, list[str]]:
    """Every layer `start` imports, directly or not, with the chain of layers that leads to it."""
    paths = {start: [start]}
    pending = [start]
    while pending:
        layer = pending.pop()
        for target in graph.get(layer, {}):
            if target not in paths:
                paths[target] = [*paths[layer], target]
                pending.append(target)
    return paths


def describe(graph: Graph, chain: list[str]) -> str:
    """`a -> b -> c`, then where each step's imports are."""
    steps = [f"  {a} -> {b}: {', '.join(graph[a][b])}" for a, b in itertools.pairwise(chain)]
    return " -> ".join(chain) + "\n" + "\n".join(steps)


def test_no_cycle_between_layers() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between layers:\n" + describe(graph, cycle or [])


def test_the_runtime_never_imports_the_cli_the_bench_or_the_scaffolding() -> None:
    graph = import_graph()
    for runtime in RUNTIME:
        assert runtime in graph, f"no package {runtime}: update RUNTIME"
        paths = reachable(graph, runtime)
        for forbidden in OFF_THE_RUNTIME_PATH:
            assert forbidden not in paths, f"{runtime} reaches {forbidden}:\n" + describe(graph, paths[forbidden])


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    package = tmp_path / "multillm"
    (package / "a").mkdir(parents=True)
    (package / "b").mkdir()
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import multillm.c\nelse:\n    import multillm.c\n"
    )
    (package / "a" / "x.py").write_text("def f() -> None:\n    from multillm.b import y\n")
    (package / "b" / "__init__.py").write_text("")
    (package / "b" / "y.py").write_text("from ..a import x\n")
    (package / "c.py").write_text("")
    graph = import_graph(package)
    # The `else:` of `if TYPE_CHECKING:` runs: its import counts, the one above it does not.
    assert graph["multillm.a"] == {"multillm.c": ["multillm/a/__init__.py:5"], "multillm.b": ["multillm/a/x.py:2"]}
    assert find_cycle(graph) == ["multillm.a", "multillm.b", "multillm.a"]


def test_importing_the_cli_loads_no_scaffolding() -> None:
    """The parser offers the benchmark's scenario names, so `multillm.bench` itself (a dict) is
    loaded; nothing else of the benchmark, and nothing of the scaffolding, until a command needs it."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, multillm.cli; print('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [m for m in loaded if m.startswith(("multillm.testbed", "multillm.bench."))] == []

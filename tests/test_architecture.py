"""The package's import graph: no cycles, and no lower layer importing a higher one.

What users (and maintainers) rely on: ``models/`` works without the pipeline (research code
imports it alone), the pipeline runs without Prefect (notebooks, tests, Dask workers), and
each stage package can be read without the ones after it. The graph is built from the
source with ``ast`` (every import, including those inside functions and under
``TYPE_CHECKING``), so a lazy import cannot hide a cycle. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Repository folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGE_DIRS = {"sand": "sand", "models": "sand.models", "pipeline": "sand.pipeline", "flows": "sand.flows"}

#: Lowest first; a module may import modules of its own layer or lower ones only.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("models", ("sand.models",)),
    ("pipeline base", ("sand.pipeline", "sand.pipeline.base")),
    ("stage context", ("sand.pipeline.stage_context",)),
    ("acquire", ("sand.pipeline.acquire",)),
    ("dataset", ("sand.pipeline.dataset",)),
    ("features", ("sand.pipeline.features",)),
    ("training", ("sand.pipeline.training",)),
    ("experiments", ("sand.pipeline.experiments",)),
    ("serving", ("sand.pipeline.serving",)),
    ("stage table", ("sand.pipeline.stages",)),
    ("runner", ("sand.pipeline.runner",)),
    ("flows", ("sand.flows",)),
    ("top package", ("sand", "sand.api")),
]


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (``pipeline/features/knn.py``: ``sand.pipeline.features.knn``)."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_names(path: Path, module: str, is_package: bool) -> Iterator[str]:
    """Absolute names of everything ``path`` imports, anywhere in the file."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)  # ``from pkg import module``


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names that are not modules map to their module)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(path, module, path.name == "__init__.py"):
            while name and name not in files:  # ``from sand.pipeline.base.store import Artifact`` -> the store
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix that holds ``module``."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            holds = module == prefix or (module.startswith(prefix + ".") and prefix not in ("sand", "sand.pipeline"))
            if holds and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py "
                             "and to the list in docs/architecture.md")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The walker is what the other tests trust: a lazy import and a relative one are edges too."""
    path = tmp_path / "mod.py"
    path.write_text("from . import sibling\nfrom ..other import thing\n\ndef f():\n    import sand.pipeline.runner\n")
    names = set(imported_names(path, "sand.pipeline.features.mod", is_package=False))
    assert {"sand.pipeline.features.sibling", "sand.pipeline.other.thing", "sand.pipeline.runner"} <= names
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_is_in_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_lower_layer_imports_a_higher_one():
    graph = import_graph()
    wrong = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not wrong, "layer violations:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("models", ("sand.pipeline", "sand.flows", "prefect", "prefect_dask")),
    ("pipeline", ("sand.flows", "prefect", "prefect_dask")),
])
def test_models_and_pipeline_never_import_what_sits_above_them(folder, forbidden):
    files = module_files()
    wrong = [
        f"{module} imports {name}"
        for module, path in files.items()
        if path.is_relative_to(ROOT / folder)
        for name in imported_names(path, module, path.name == "__init__.py")
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_pipeline_root_reads_bottom_up():
    """Base modules sit in ``pipeline/base/``; the root keeps only the table, its runner and the context."""
    root_modules = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(root_modules) <= 6, f"pipeline/ root holds {len(root_modules)} modules: {root_modules}"
    base = {p.stem for p in (ROOT / "pipeline" / "base").glob("*.py")}
    assert {"errors", "config", "store", "files"} <= base


#: The codebase's rule for product code: a function longer than this is split into named helpers.
MAX_FUNCTION_LINES = 80


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (n lines)`` for each function or method in ``path`` (nested ones too) over ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno} "
                             f"{node.name} ({lines} lines)")
    return found


def test_the_length_check_counts_from_def_to_last_line(tmp_path):
    """The walker the rule trusts: def..last line inclusive, methods and nested and async functions included."""
    path = tmp_path / "mod.py"
    path.write_text(
        "def short():\n" + "    x = 1\n" * 79  # lines 1-80: exactly at the limit, allowed
        + "class C:\n    async def long(self):\n" + "        x = 1\n" * 80  # lines 82-162: 81 lines
    )
    assert long_functions(path) == [f"{path}:82 long (81 lines)"]
    assert long_functions(path, limit=81) == []


def test_no_product_function_is_over_80_lines():
    """Long functions hide several jobs in one; the product folders keep each under the limit."""
    too_long = [hit for folder in PACKAGE_DIRS for path in sorted((ROOT / folder).rglob("*.py"))
                for hit in long_functions(path)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named helpers):\n" + \
        "\n".join(too_long)


def test_every_package_is_in_the_wheel():
    """pyproject.toml lists packages by hand (package-dir mapping): a new sub-package must join the list."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module for module, path in module_files().items() if path.name == "__init__.py"}
    assert packages - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"

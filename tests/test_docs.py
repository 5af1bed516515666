"""The docs tell the truth about the code: every dotted name and path they mention exists; the README stays short.

Docstrings, comments, ``README.md`` and ``docs/*.md`` name modules and their functions
(``sand.pipeline.base.config``, ``pipeline.runner.run_stage``) so a reader can find them.
When a module is renamed or moved, those names go stale silently; this test resolves every
one against the source (modules by file, attributes with ``ast``: nothing is imported, so
torch and Prefect stay out of the fast tier) and lists the names that no longer exist.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from test_architecture import ROOT, module_files

#: Folders whose Python files' docstrings and comments are checked.
CODE_FOLDERS = ("sand", "pipeline", "flows", "models", "tests", "benchmarks")
#: A dotted name starting with one of the package's parts; not preceded by a word character,
#: a dot or a slash (``self.models.x``, ``src/pipeline.py`` are something else).
DOTTED = re.compile(r"(?<![\w./-])(?:sand|pipeline|flows|models)(?:\.[A-Za-z_]\w*)+")
#: ``flows.py``, ``models.yaml``: file names, not dotted names.
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "csv", "npy", "pt", "log", "toml", "txt", "png", "inter"}


def canonical(name: str) -> str:
    """``pipeline.runner`` is ``sand.pipeline.runner`` once installed (the package-dir mapping)."""
    return name if name.startswith("sand") else f"sand.{name}"


@cache
def module_tree(module: str) -> ast.Module:
    return ast.parse(module_files()[module].read_text())


def defined_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body binds: definitions, assignments, imports."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names[leaf.id] = node
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):  # ``if TYPE_CHECKING:`` and ``try: import ...``
            names.update(defined_names(node.body))
            names.update(defined_names(node.orelse))
    return names


def resolves(name: str) -> bool:
    """``name`` is a module, or a module followed by names defined in it (a class's members too)."""
    parts = canonical(name).split(".")
    if parts[-1] in FILE_SUFFIXES:
        parts = parts[:-1]
    files = module_files()
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in files:
            break
    else:
        return False
    body: list[ast.stmt] = module_tree(module).body
    for attribute in parts[cut:]:
        found = defined_names(body).get(attribute)
        if found is None:
            return False
        if not isinstance(found, ast.ClassDef):
            return True  # a function's or a value's own attributes are beyond what prose names
        body = found.body
    return True


def python_prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every docstring and comment in a Python file."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = node.body[0] if node.body else None
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                yield doc.lineno, doc.value.value
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string


def prose_files() -> Iterator[Path]:
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    for folder in CODE_FOLDERS:
        yield from sorted(p for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def stale_names(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every dotted name in ``path``'s prose that does not resolve."""
    texts = python_prose(path) if path.suffix == ".py" else enumerate(path.read_text().splitlines(), 1)
    return [
        (line, match.group())
        for line, text in texts
        for match in DOTTED.finditer(text)
        if not resolves(match.group())
    ]


def test_the_resolver_tells_live_names_from_stale_ones(tmp_path):
    """What the scan trusts: modules, their functions, class members and file names resolve; renamed ones do not."""
    assert resolves("sand.pipeline.runner")
    assert resolves("pipeline.runner.run_stage")
    assert resolves("sand.pipeline.base.store.ArtifactStore")
    assert resolves("sand.pipeline.stages.Stage.flow_name")
    assert resolves("flows.cli")
    assert resolves("models.sand.py")
    assert not resolves("pipeline.data")
    assert not resolves("pipeline.images.fetch_images")
    assert not resolves("sand.pipeline.runner.no_such_function")
    assert not resolves("sand.pipeline.stages.Stage.no_such_member")
    doc = tmp_path / "doc.md"
    doc.write_text("See `pipeline.readers.read_reviews` and sand.pipeline.runner, not self.models.x.\n")
    assert stale_names(doc) == [(1, "pipeline.readers.read_reviews")]
    code = tmp_path / "mod.py"
    code.write_text('"""Uses pipeline.data."""\n\nx = "pipeline.data"  # and flows.gone.thing\n')
    assert [text for _, text in python_prose(code)] == ["Uses pipeline.data.", "# and flows.gone.thing"]
    assert stale_names(code) == [(1, "pipeline.data"), (3, "flows.gone.thing")]


#: A repository path in the Markdown docs (``pipeline/base/config.py``, ``docs/scaling.md``).
REPO_PATH = re.compile(r"(?<![\w./-])(?:sand|pipeline|flows|models|tests|benchmarks|docs)/[\w/]+\.(?:py|md|png)")


def test_every_repository_path_in_the_docs_exists():
    """The README and docs/ point readers at files (the "files touched" table, the layout): each one is there."""
    missing = [
        f"{path.relative_to(ROOT)}:{line}: {match.group()}"
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for line, text in enumerate(path.read_text().splitlines(), 1)
        for match in REPO_PATH.finditer(text)
        if not (ROOT / match.group()).exists()
    ]
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_every_dotted_name_in_docs_and_comments_exists():
    stale = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in prose_files() for line, name in stale_names(path)]
    assert not stale, "names of modules or attributes that do not exist:\n" + "\n".join(stale)


def test_the_readme_stays_what_a_user_does():
    """At most 300 lines: measurements live in docs/benchmarks.md, details in docs/, linked from it."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail or measurements to docs/"
    assert "](docs/benchmarks.md)" in "\n".join(lines)

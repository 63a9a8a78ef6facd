"""trainer/ depends on models/ and kernels/, never the reverse: no module under models/ or kernels/ imports
kvforge.trainer, at the top or inside a function (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder in the repo -> the package it is installed as (pyproject.toml [tool.setuptools.package-dir]).
LOWER_LAYERS = {"models": "kvforge.models", "kernels": "kvforge.kernels"}
FORBIDDEN = "kvforge.trainer"


def module_name(path: Path, root: Path, package: str) -> str:
    """`path` under the folder `root`, which is installed as `package`, as a module name."""
    parts = path.relative_to(root).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((package, *parts))


def imported_modules(path: Path, root: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; `from X import y` counts as X and X.y (y may
    be a submodule), relative imports resolved against the file's package."""
    name = module_name(path, root, package)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def lower_layer_files() -> list[tuple[str, Path]]:
    return [(folder, path) for folder in LOWER_LAYERS for path in sorted((REPO / folder).rglob("*.py"))]


def test_the_walk_sees_every_form_of_import(tmp_path):
    """The checker itself: absolute, from-, relative and package-relative imports of the trainer are caught."""
    fake = tmp_path / "models" / "surgery"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    probe = fake / "probe.py"
    probe.write_text("import os\n"
                     "import kvforge.trainer.train\n"
                     "from kvforge.trainer import checkpoint\n"
                     "from kvforge import trainer\n"
                     "def lazy():\n    from ...trainer.data import build_packed_datasets\n"
                     "from ... import trainer as t\n"
                     "from ..calibration import collect_statistics\n")
    hits = {line for line, target in imported_modules(probe, tmp_path / "models", "kvforge.models")
            if target == FORBIDDEN or target.startswith(FORBIDDEN + ".")}
    assert hits == {2, 3, 4, 6, 7}


@pytest.mark.parametrize("folder,path", [pytest.param(folder, path, id=str(path.relative_to(REPO)))
                                         for folder, path in lower_layer_files()])
def test_models_and_kernels_never_import_the_trainer(folder, path):
    offending = [f"{path.relative_to(REPO)}:{line} imports {target}" for line, target in imported_modules(path, REPO / folder, LOWER_LAYERS[folder])
                 if target == FORBIDDEN or target.startswith(FORBIDDEN + ".")]
    assert not offending, ("models/ and kernels/ must not depend on trainer/ (the trainer depends on them): "
                           + "; ".join(offending))


def import_cycles(root: Path, package: str) -> list[list[str]]:
    """Strongly connected groups (> 1 module) of the import graph of the modules under `root` (imports inside
    functions included; a submodule importing its own package face is not an edge)."""
    modules = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for _, target in imported_modules(path, root, package):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    # Tarjan's algorithm.
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from kvforge.models.a import f\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    assert import_cycles(tmp_path, "kvforge.models") == [["kvforge.models.a", "kvforge.models.b"]]


@pytest.mark.parametrize("folder", ["models", "trainer"])
def test_no_import_cycles(folder):
    """One direction per dependency inside models/ and trainer/ (issue 13): a cycle, even through a lazy import,
    means two modules that cannot be read or changed one at a time."""
    assert import_cycles(REPO / folder, f"kvforge.{folder}") == []

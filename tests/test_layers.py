"""The layer table of docs/architecture.md, enforced: every import in sea_ray/ (function-level ones
included) goes to the importer's own layer or a lower one, no module is left without a layer,
there is no import cycle, nothing in sea_ray/ imports the CLI, and an import inside a function is
for what is heavy or optional only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sea_ray"


def layer_table() -> dict[str, int]:
    """module prefix -> layer, read from the Markdown table of docs/architecture.md."""
    table = {}
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            for name in re.findall(r"`(sea_ray[\w.]*)`", cells[2]):
                table[name] = int(cells[0])
    return table


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_targets(node: ast.AST, name: str, path: Path, known: dict[str, Path]) -> list[str]:
    """What an import statement of module ``name`` imports: sea_ray modules (a `from pkg import mod`
    names the submodule) and, for any other import, its top-level package (``torch``, ``json``)."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        base = node.module or ""
        if node.level:
            root = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(root + ([node.module] if node.module else []))
        submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        # `from pkg import mod` names the module; the package itself only when a name is not one
        targets = submodules + ([base] if len(submodules) < len(node.names) else [])
    out = []
    for target in targets:
        if target == "sea_ray" or target.startswith("sea_ray."):
            while target and target not in known:
                target = target.rpartition(".")[0]
        else:
            target = target.partition(".")[0]
        out.append(target)
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The sea_ray modules ``name`` imports (a `from pkg import mod` names the submodule)."""
    return {target for node in ast.walk(ast.parse(path.read_text()))
            for target in import_targets(node, name, path, known) if target in known and target != name}


def split_imports(path: Path) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """(the import statements run when the module is imported, those inside its functions)."""
    tree = ast.parse(path.read_text())
    in_functions = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return [n for n in imports if id(n) not in in_functions], [n for n in imports if id(n) in in_functions]


def top_level_closure(known: dict[str, Path]) -> dict[str, set[str]]:
    """sea_ray module -> the other packages importing it imports: through the module-level imports
    of it, of the sea_ray modules those import, and so on (a package's ``__init__`` included)."""
    direct = {}
    for name, path in known.items():
        top, _ = split_imports(path)
        direct[name] = {target for node in top for target in import_targets(node, name, path, known)}
        if "." in name:
            direct[name].add(name.rpartition(".")[0])  # importing sea_ray.x.y runs sea_ray.x first

    def pulled(name: str) -> set[str]:
        seen, todo, out = set(), [name], set()
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                for target in direct[module]:
                    if target in known:
                        todo.append(target)
                    else:
                        out.add(target)
        return out

    return {name: pulled(name) for name in known}


def layer_of(name: str, table: dict[str, int]) -> int | None:
    best = max((p for p in table if name == p or name.startswith(p + ".")), key=len, default=None)
    return None if best is None else table[best]


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer(graph):
    table = layer_table()
    assert len(table) > 20, "the layer table of docs/architecture.md was not found"
    assert [m for m in graph if layer_of(m, table) is None] == []


def test_no_import_goes_up_a_layer(graph):
    table = layer_table()
    upward = sorted(f"{m} (layer {layer_of(m, table)}) imports {t} (layer {layer_of(t, table)})"
                    for m, targets in graph.items() for t in targets
                    if layer_of(t, table) is not None and layer_of(m, table) is not None
                    and layer_of(t, table) > layer_of(m, table))
    assert upward == []


def test_no_import_cycle(graph):
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_cli_is_a_leaf(graph):
    assert [m for m, targets in graph.items() if "sea_ray.cli" in targets] == []


# Ray's private modules, only where no public API exists; each use names its reason and a test
# that pins it (runtime: the loopback switch, tests/test_security.py; submit: token auth).
PRIVATE_RAY_ALLOWED = {"sea_ray.runtime", "sea_ray.submit"}


def test_ray_private_only_where_pinned():
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(t == "ray._private" or t.startswith("ray._private.") for t in targets):
                found.append(name)
    assert sorted(set(found) - PRIVATE_RAY_ALLOWED) == []


# Third-party packages slow to import or optional (the list): what a function-level import
# may be there to put off.
HEAVY_OR_OPTIONAL = {"fsspec", "matplotlib", "numpy", "open_clip", "optuna", "peft", "PIL", "pyarrow", "pydantic",
                     "ray", "s3fs", "safetensors", "sklearn", "tensorboard", "torch", "torchvision", "transformers",
                     "yaml"}

def test_function_level_imports_are_heavy_or_optional():
    """A sea_ray module imported inside a function must pull (through its module-level imports) a
    heavy or optional package that the importing module does not already pull at its top level;
    any other import of a sea_ray module belongs at the top of the file. (An import of a third-party
    package itself, ``import torch`` in a function, is not this test's business.)"""
    known = modules()
    pulled = top_level_closure(known)
    offenders = []
    for name, path in sorted(known.items()):
        where = path.relative_to(REPO).as_posix()
        for node in split_imports(path)[1]:
            for target in import_targets(node, name, path, known):
                if target in known and not (pulled[target] - pulled[name]) & HEAVY_OR_OPTIONAL:
                    offenders.append((where, node.lineno, target))
    assert [f"{where}:{line} {target}" for where, line, target in sorted(offenders)] == []

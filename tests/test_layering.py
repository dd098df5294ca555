"""The layering of DESIGN.md §2, checked on the source: no import cycle anywhere, and no import
from a lower layer to a higher one.

    python tests/test_layering.py      # prints every problem, exit code 1 if there is one

Every `import` and `from ... import` of the project's own packages counts, at module level or
inside a function (a lazy import is still a dependency); only imports under `if TYPE_CHECKING:`
are left out, since they never run. The layers, lowest first:

    engines  <-  build_scripts  <-  orchestrator  <-  serving  <-  model_repo, bench

- `engines` imports no other layer; the orchestrator sees only `engines.base` (the contract),
  never torch, a concrete engine or the engine loader;
- `build_scripts` imports only `engines`;
- `serving` and `model_repo` import an engine only through its public modules (`engines.base`,
  `engines.loader`, `engines.manifest`, `engines.faults`: engine-agnostic fault injection), never a
  module whose name starts with "_";
- `bench` and `tests` may import anything.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("engines", "build_scripts", "orchestrator", "serving", "model_repo", "bench")

ALLOWED = {
    "engines": {"engines"},
    "build_scripts": {"engines", "build_scripts"},
    "orchestrator": {"orchestrator", "engines.base"},
    "serving": {"serving", "orchestrator", "engines.base", "engines.loader", "engines.manifest", "engines.faults"},
    "model_repo": {"model_repo", "serving", "orchestrator", "engines.base", "engines.loader", "engines.manifest",
                   "engines.faults"},
    "bench": set(PACKAGES),
}
"""What each layer may import: a package, or one module of another package."""

FORBIDDEN_THIRD_PARTY = {
    "orchestrator": {"torch", "tensorrt_llm", "fastapi", "uvicorn", "starlette", "triton_python_backend_utils"},
    "engines": {"fastapi", "uvicorn", "starlette", "triton_python_backend_utils"},
    "build_scripts": {"fastapi", "uvicorn", "starlette", "triton_python_backend_utils"},
}
"""Libraries a layer must not import at all (the orchestrator decides; it never holds a tensor)."""


def modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(path: Path) -> set[str]:
    """Every dotted name `path` imports (for `from a.b import c`: a.b and a.b.c), outside
    TYPE_CHECKING blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            for child in node.orelse:  # the else branch runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package import counts as its __init__)."""
    mods = modules(root)
    edges = {}
    for name, path in mods.items():
        targets = set()
        for imported in imports(path):
            # `import a.b.c` also runs a and a.b: the nearest project module is what it depends on
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _allowed(source: str, target: str) -> bool:
    layer = source.split(".")[0]
    return any(target == a or target.startswith(a + ".") for a in ALLOWED[layer])


def upward_imports(root: Path = REPO) -> list[str]:
    """Every import that crosses the layering the wrong way (for serving: reaches past an engine's
    public modules), or pulls in a library the layer must not use."""
    problems = []
    mods = modules(root)
    for name, targets in sorted(graph(root).items()):
        layer = name.split(".")[0]
        for target in sorted(targets):
            if not _allowed(name, target):
                problems.append(f"{name} imports {target}: {layer} may import only {sorted(ALLOWED[layer])}")
        banned = FORBIDDEN_THIRD_PARTY.get(layer, set())
        for library in sorted({i.split(".")[0] for i in imports(mods[name])} & banned):
            problems.append(f"{name} imports {library}: {layer} must not import it")
    return problems


def problems(root: Path = REPO) -> list[str]:
    found = upward_imports(root)
    found += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph(root))]
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_import_crosses_the_layers_upward():
    assert upward_imports() == []


def test_the_check_sees_every_package_and_would_catch_a_violation(tmp_path):
    """The checker itself: it reads all six packages, and it reports a planted cycle, a planted
    upward import and a planted torch import in the orchestrator."""
    assert {name.split(".")[0] for name in modules()} == set(PACKAGES)
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "engines" / "a.py").write_text("from engines import b\n")
    (tmp_path / "engines" / "b.py").write_text("def f():\n    import engines.a\n")
    (tmp_path / "engines" / "up.py").write_text("from orchestrator import x\n")
    (tmp_path / "orchestrator" / "x.py").write_text(
        "import torch\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import serving.y\n")
    (tmp_path / "serving" / "y.py").write_text("from engines import _private\n")
    (tmp_path / "engines" / "_private.py").write_text("")
    found = problems(tmp_path)
    assert "import cycle: engines.a <-> engines.b" in found
    assert any(p.startswith("engines.up imports orchestrator.x") for p in found)
    assert any(p.startswith("orchestrator.x imports torch") for p in found)
    assert any(p.startswith("serving.y imports engines._private") for p in found)
    assert not any("orchestrator.x imports serving" in p for p in found)  # TYPE_CHECKING only


if __name__ == "__main__":
    found = problems()
    for line in found:
        print(line)
    print(f"{len(modules())} modules checked: " + (f"{len(found)} problems" if found else "no cycle, no upward import"))
    sys.exit(1 if found else 0)

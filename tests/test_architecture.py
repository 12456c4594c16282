"""The house's layers (docs/ARCHITECTURE.md), read from the code's own imports.

Every `import` and `from … import` anywhere in a file counts — inside functions and under
`TYPE_CHECKING` too — because a lazy import that dodges a cycle at run time still ties two files
together for whoever reads them. A module may import its own package's modules and anything in a lower
layer; never a sibling package of its own layer, never a higher layer, and no chain of imports may
come back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fusekit"

# Lowest first. A layer is a list of rooms (a package or a module, by dotted name under fusekit);
# rooms of one layer do not import each other.
LAYERS: list[tuple[str, list[str]]] = [
    ("rust core", ["_core"]),
    ("plumbing", ["_version", "progress", "_procmem", "_ray", "_callable", "_prefetch", "_parallel", "_units"]),
    ("inputs", ["vocab", "corpus", "models"]),
    ("shared specs and offline assets", ["specs", "zoo"]),
    ("stores", ["store"]),
    ("preprocessing stages", ["extract", "align", "prepare"]),
    ("fusion rules", ["fuse"]),
    ("training", ["train"]),
    ("downstream stages", ["eval", "merge", "implicit"]),
    ("recipes", ["recipe"]),
    ("drivers", ["pipeline", "plan"]),
    ("recipes of recipes", ["fusechat", "demo"]),
    ("public API", ["api"]),
    ("command line", ["cli"]),
    ("python -m fusekit", ["__main__"]),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    modules["fusekit._core"] = PACKAGE / "_core.pyi"  # the compiled Rust core: a leaf
    return modules


def imported_modules(path: Path, modules: dict[str, Path], root: Path = ROOT) -> set[str]:
    """The fusekit modules `path` imports anywhere, resolved to the module that defines each name."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name` runs pkg's __init__ and reads the name there, so it ties this file to
            # pkg itself, and to the submodule pkg.name where there is one. (Import a module by its own
            # name — `import fusekit.x.y as y`, `from fusekit.x.y import z` — to depend on it alone.)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)]
        else:
            continue
        for target in targets:
            if target == "fusekit" or target.startswith("fusekit."):
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target != me:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(path, modules) if path.suffix == ".py" else set() for name, path in modules.items()}


def room_of(module: str) -> str | None:
    """The room (first name under fusekit) a module lives in; None for the package's own __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_of(room: str) -> int:
    for i, (_, rooms) in enumerate(LAYERS):
        if room in rooms:
            return i
    raise KeyError(room)


def test_every_room_has_a_layer():
    rooms = {room_of(m) for m in import_graph()} - {None}
    unplaced = sorted(r for r in rooms if not any(r in rs for _, rs in LAYERS))
    assert not unplaced, f"rooms without a layer in LAYERS (and docs/ARCHITECTURE.md): {unplaced}"


def test_imports_point_down():
    graph = import_graph()
    wrong = []
    for module, targets in sorted(graph.items()):
        room = room_of(module)
        if room is None:
            continue  # fusekit/__init__ re-exports the public API from every layer
        for target in sorted(targets):
            other = room_of(target)
            if other is None:
                wrong.append(f"{module} -> fusekit (import the module that defines the name instead)")
            elif other != room and layer_of(other) >= layer_of(room):
                wrong.append(f"{module} ({LAYERS[layer_of(room)][0]}) -> {target} ({LAYERS[layer_of(other)][0]})")
    assert not wrong, "imports that do not point to a lower layer:\n" + "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_namespace_packages():
    missing = sorted(
        str(d.relative_to(ROOT)) for d in PACKAGE.rglob("*") if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").exists()
    )
    assert not missing, f"folders of modules without __init__.py (namespace packages): {missing}"


@pytest.mark.parametrize("source", ["import fusekit.a.b", "from fusekit.a import b", "from .a import b", "from . import a", "from fusekit.a.b import x"])
def test_import_reader_resolves_submodules(tmp_path, source):
    pkg = tmp_path / "fusekit"
    (pkg / "a").mkdir(parents=True)
    for f in ["__init__.py", "a/__init__.py", "a/b.py"]:
        (pkg / f).write_text("")
    (pkg / "c.py").write_text(source + "\n")
    modules = {module_name(p, tmp_path): p for p in sorted(pkg.rglob("*.py"))}
    expected = {
        "import fusekit.a.b": {"fusekit.a.b"},
        "from fusekit.a import b": {"fusekit.a", "fusekit.a.b"},
        "from .a import b": {"fusekit.a", "fusekit.a.b"},
        "from . import a": {"fusekit", "fusekit.a"},
        "from fusekit.a.b import x": {"fusekit.a.b"},
    }[source]
    assert imported_modules(pkg / "c.py", modules, tmp_path) == expected

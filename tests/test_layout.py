"""The layout is the architecture: the folders of product code import each other without a loop,
and the library never reaches up into the application layer or the commands."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("tuning", "experiments", "search_spaces", "trainables")
APP = ("tuning.app", "tuning")  # the application layer, and the commands in tuning/ itself


def folder_of(module: str) -> str | None:
    """The product folder (dotted) that holds `module`, or None outside the product."""
    parts = module.split(".")
    if parts[0] not in PRODUCT:
        return None
    for end in range(len(parts), 0, -1):
        if (ROOT.joinpath(*parts[:end]) / "__init__.py").is_file():
            return ".".join(parts[:end])
    return parts[0]


def modules() -> dict[str, Path]:
    """Every product module by dotted name (a package by its folder's name)."""
    found = {}
    for top in PRODUCT:
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            found[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return found


def imported_names(path: Path) -> list[str]:
    """Every absolute `import` in a file (inside functions too), `from a import b` as a and a.b."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def imports() -> dict[str, set[str]]:
    """Each product folder's imported folders."""
    graph: dict[str, set[str]] = {}
    for module, path in modules().items():
        here = folder_of(module) if path.name != "__init__.py" else module
        targets = graph.setdefault(here, set())
        for name in imported_names(path):
            folder = folder_of(name)
            if folder is not None and folder != here:
                targets.add(folder)
    return graph


def module_imports() -> dict[str, set[str]]:
    """Each product module's imported product modules."""
    known = modules()
    return {module: {n for n in imported_names(path) if n in known and n != module} for module, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_known_edges():
    graph = imports()
    assert "tuning.lib" in graph["trainables"] and "tuning.app" in graph["tuning"]
    assert "tuning.lib.data" in graph["experiments"] and "trainables" in graph["tuning.app"]


def test_product_folders_import_each_other_without_a_loop():
    assert find_cycle(imports()) is None, find_cycle(imports())


def test_product_modules_import_each_other_without_a_loop():
    """Not even through an import inside a function (backbones and timm_backbones once did)."""
    graph = module_imports()
    assert "tuning.lib.backbone_spec" in graph["tuning.lib.timm_backbones"]
    assert find_cycle(graph) is None, find_cycle(graph)


def test_a_loop_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_library_and_the_lower_folders_never_import_the_application():
    graph = imports()
    below = [f for f in graph if f.startswith("tuning.lib") or f.split(".")[0] in ("trainables", "experiments", "search_spaces")]
    assert below
    for folder in below:
        assert not graph[folder] & set(APP), (folder, graph[folder] & set(APP))

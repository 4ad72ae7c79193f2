"""The layers of captioner/layers.py hold: no module imports from a layer above its own, and no
modules import each other in a circle (imports inside functions count: they are dependencies too)."""

from __future__ import annotations

import ast
from pathlib import Path

import captioner
from captioner.layers import LAYERS, layer_of

ROOT = Path(captioner.__file__).parent
RANK = {name: i for i, name in enumerate(LAYERS)}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _known(name: str, modules: set[str]) -> str:
    """`captioner.a.b.C` -> the module it names ("captioner.a.b" when C is a name in it)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """{module: the captioner modules it imports}, from every import statement in it."""
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {target + "." + a.name for a in node.names} if not node.module else {target}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("captioner"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("captioner")}
        graph[mod] = {_known(d, set(files)) for d in deps} - {mod}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if RANK[layer_of(d)] > RANK[layer_of(m)]
    ]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    # a package's __init__ gathers its modules: an edge into the package and out to its modules is no circle
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                found.append(path[path.index(d) :] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_every_module_has_a_layer_and_imports_only_its_own_layer_or_below():
    upward = upward_imports(import_graph())
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_catch_an_upward_import_and_a_circle():
    graph = import_graph()
    assert "captioner.model" in graph["captioner.api"]  # the graph sees real imports
    bad = graph | {"captioner.vocab": graph["captioner.vocab"] | {"captioner.api"}}
    assert upward_imports(bad) == ["captioner.vocab (core) imports captioner.api (inference)"]
    assert circles({"captioner.a": {"captioner.b"}, "captioner.b": {"captioner.a"}}) == [
        ["captioner.a", "captioner.b", "captioner.a"]
    ]
    assert layer_of("captioner") == "apps" and layer_of("captioner.features.cache") == "vision"


def test_cli_help_starts_without_torch():
    """`captioner --help` and every `captioner CMD --help` load no torch, numpy or PIL (their start-up
    time is measured by benchmarks/cli_startup.py)."""
    import subprocess
    import sys

    code = (
        "import argparse, sys\n"
        "from captioner.cli import build_parser, main\n"
        "[sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]\n"
        "for argv in [['--help']] + [[name, '--help'] for name in sub.choices]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(len(sub.choices), sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    count, loaded = out.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 10 and loaded == "[]"

"""The package's imports point down: no circle between modules or between sub-packages, and each
floor keeps to what it may know. Imports inside functions and under TYPE_CHECKING count too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "replicate_generation"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# What a module may never import, whatever the route: (importer prefix, forbidden prefixes).
FORBIDDEN = [
    ("errors", ("",)),
    ("models", ("model_functions", "generation", "jobs", "app", "http", "web", "limits",
                "concurrency_manager", "library", "cli")),
    ("outputs", ("model_functions", "generation", "jobs", "app", "http", "web", "models",
                 "limits", "concurrency_manager", "library", "cli")),
    # The egress policy sits just above errors: webhooks and outputs both lean on it.
    ("egress", ("model_functions", "generation", "jobs", "app", "http", "web", "models",
                "outputs", "limits", "concurrency_manager", "library", "cli", "settings",
                "devtools", "clients", "metrics")),
    ("limits", ("model_functions", "generation", "jobs", "app", "http", "web", "models",
                "outputs", "concurrency_manager", "library", "cli")),
    ("concurrency_manager", ("model_functions", "generation", "jobs", "app", "http", "web",
                             "models", "outputs", "library", "cli")),
    ("model_functions", ("generation", "jobs", "app", "http", "web", "library", "cli")),
    ("jobs", ("app", "http", "web", "library", "cli")),
    ("http", ("app", "web", "cli")),
    ("devtools.simulator", ("app", "http", "jobs", "model_functions", "generation", "library")),
    # The image's PID 1 sits beside launch: it starts the service, never imports it.
    ("edge", ("app", "http", "web", "ops", "jobs", "library", "cli", "model_functions",
              "generation", "dispatcher", "limits", "concurrency_manager", "outputs", "devtools")),
]
# Third-party packages a layer must not load (the spine's promises: no Flask below the HTTP layer).
FORBIDDEN_EXTERNAL = [
    ("concurrency_manager", ("flask", "replicate", "werkzeug")),
    ("limits", ("flask", "replicate", "werkzeug")),
    ("model_functions", ("flask", "werkzeug")),
    ("models", ("flask", "werkzeug")),
    ("edge", ("flask", "replicate", "werkzeug")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported(path: Path, name: str) -> Iterator[str]:
    """Every module name this file imports, at any depth, relative imports resolved."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = f"{PACKAGE}.{name}".split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def internal_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names relative to the package)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target in imported(path, name):
            if target == PACKAGE or not target.startswith(PACKAGE + "."):
                continue
            relative = target[len(PACKAGE) + 1:]
            if relative in known and relative != name:
                graph[name].add(relative)
    return graph


def external_imports(name: str) -> set[str]:
    return {target.split(".")[0] for target in imported(modules()[name], name)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def room(name: str) -> str:
    """A sub-package counts as one room; a module of the package root is its own room."""
    return name.split(".")[0] if "." in name or (ROOT / name).is_dir() else name


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for name, targets in graph.items():
        rooms.setdefault(room(name), set()).update(
            room(target) for target in targets if room(target) != room(name))
    return rooms


def edges_within(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    members = set(component)
    return [f"{source} -> {target}" for source in component
            for target in sorted(graph[source] & members)]


def test_no_module_imports_itself_back_through_others() -> None:
    graph = internal_graph()
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(
        ", ".join(edges_within(graph, component)) for component in found)


def test_no_sub_package_imports_itself_back_through_others() -> None:
    graph = room_graph(internal_graph())
    found = cycles(graph)
    assert not found, "circles between sub-packages: " + "; ".join(
        ", ".join(edges_within(graph, component)) for component in found)


def within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(("importer", "forbidden"), FORBIDDEN)
def test_a_floor_never_imports_one_above_it(importer: str, forbidden: tuple[str, ...]) -> None:
    graph = internal_graph()
    wrong = sorted(f"{source} -> {target}" for source, targets in graph.items()
                   if within(source, importer) for target in targets
                   if any(within(target, prefix) for prefix in forbidden)
                   and not within(target, importer))
    assert not wrong, f"{importer} reaches up: {wrong}"


@pytest.mark.parametrize(("importer", "forbidden"), FORBIDDEN_EXTERNAL)
def test_lower_floors_know_nothing_of_the_web(importer: str, forbidden: tuple[str, ...]) -> None:
    wrong = sorted(f"{name} -> {package}" for name in modules() if within(name, importer)
                   for package in external_imports(name) & set(forbidden))
    assert not wrong, f"{importer} imports {wrong}"


def test_the_checker_sees_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert edges_within(graph, ["a", "b", "c"]) == ["a -> b", "b -> c", "c -> a"]


def test_the_checker_reads_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from replicate_generation.app import create_app\n"
                      "def f():\n    from . import settings\n")
    found = set(imported(source, "limits.mod"))
    assert {"replicate_generation.app", "replicate_generation.limits.settings"} <= found

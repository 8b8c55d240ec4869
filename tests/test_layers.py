"""The platform's modules point one way: no import circle in platform/robustune, counting the imports inside
functions too (a lazy import hides a circle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "robustune"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The platform modules that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "robustune" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(PACKAGE / f"{name}.py", modules) - {name} for name in sorted(modules)}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a -> b -> ... -> a) if there is any."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        stack.pop()
        state[node] = "done"
        return None

    for node in graph:
        if node not in state:
            circle = visit(node)
            if circle:
                return circle
    return None


def test_the_walker_finds_imports_inside_functions_and_circles(tmp_path):
    module = tmp_path / "a.py"
    module.write_text("import os\nfrom robustune.b import thing\n\ndef f():\n    from robustune import c\n"
                      "    import robustune.d.sub\n")
    assert imports_of(module, {"b", "c", "d", "e"}) == {"b", "c", "d"}
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_platform():
    graph = import_graph()
    assert {"config", "training", "search", "study", "cli"} <= set(graph)  # the walk saw the package
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_lower_layers_do_not_reach_up():
    """config is the schema; data, models, attacks and defenses never import the orchestration."""
    graph = import_graph()
    orchestration = {"run", "worker", "training", "trials", "search", "study", "leaderboard", "cli", "cluster"}
    for low in ("config", "data", "models", "attacks", "defense", "losses", "loop", "checkpoints"):
        assert not graph[low] & orchestration, (low, graph[low] & orchestration)
    assert graph["config"] == set(), graph["config"]

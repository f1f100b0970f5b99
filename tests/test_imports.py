"""The package's import graph has no cycle: lower layers never import higher ones.

Function-local imports count too: a cycle hidden inside a function is still a cycle. The graph
is read from the source (ast), so the test needs no optional dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "agnews_lora"


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "agnews_lora":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("agnews_lora.")}
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: package_imports(path) & set(modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, else None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_errors_is_a_leaf_and_config_sits_just_above_it():
    graph = import_graph()
    assert graph["errors"] == set()
    # the registry of PEFT methods, the two value parsers it validates with, and hub (data.if_missing=hub
    # asks whether the Hub can serve the dataset before a run starts)
    assert graph["config"] <= {"errors", "registry", "calibration", "perturb", "hub"}
    assert graph["registry"] <= {"errors", "hub"} and graph["hub"] <= {"errors"}
    assert graph["calibration"] <= {"errors"} and graph["perturb"] <= {"errors"}


def test_the_cycle_finder_finds_a_hidden_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def closure(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every package module `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_serving_and_prediction_never_import_training():
    graph = import_graph()
    training = {"train", "loop", "selftrain", "augment", "distill", "teacher", "sweep", "study", "writeup"}
    for module in ("serve", "predict", "export"):
        assert not closure(graph, module) & training, module


def test_the_run_folder_contract_sits_below_every_command():
    graph = import_graph()
    for module in ("train", "distill", "predict", "scoring", "export", "report", "card", "robustness", "sweep"):
        assert "runs" in closure(graph, module) and "outputs" not in graph["runs"], module

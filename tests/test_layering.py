"""The package's import graph: no cycles, and inference never imports the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "imram").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the imram modules it imports anywhere in its body (lazy imports too): ``from
    P import name`` counts as importing ``P.name`` when that is a module, else ``P``."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "imram.models.registry" in graph["imram.models"]  # the walk sees real edges
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_only_training_imports_the_trainer_and_inference_never_reaches_it():
    graph = import_graph()
    importers = {m for m, deps in graph.items() if "imram.training.trainer" in deps}
    assert importers, "the walk must find the trainer's importers"
    assert {m for m in importers if not m.startswith("imram.training")} == set()
    inference = [
        "imram.evaluation",
        "imram.checkpoint",
        "imram.scoring",
        "imram.retrieval.index",
        "imram.retrieval.index_file",
        "imram.retrieval.build",
        "imram.retrieval.two_stage",
        "imram.retrieval.latency",
        "imram.serving.app",
        "imram.serving.engine",
        "imram.analysis.attention_maps",
        "imram.analysis.salient",
    ]
    reaching = {
        m for m in inference if {"imram.training", "imram.training.trainer"} & _reach(graph, m)
    }
    assert reaching == set()

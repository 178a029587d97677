"""The import rule: Ray workers and Serve replicas never need the control plane's database
code; the platform reaches them only through ``thinkforge.contract`` and the two configs;
the contract imports nothing of thinkforge; no import cycles anywhere in the package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import thinkforge

WORKER_SIDE = ["thinkforge.jobs", "thinkforge.serve"]


@pytest.mark.parametrize("package", WORKER_SIDE)
def test_worker_packages_load_no_database_code(package: str) -> None:
    code = f"""
import importlib, json, pkgutil, sys
import {package} as pkg
loaded = [pkg.__name__]
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        if "vllm" not in str(exc):  # the optional extra; everything else must import
            raise
        continue
    loaded.append(info.name)
bad = sorted(m for m in sys.modules if m == "sqlalchemy" or m.startswith(("sqlalchemy.", "thinkforge.platform")))
print(json.dumps({{"loaded": loaded, "bad": bad}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["loaded"]) > 1
    assert result["bad"] == [], f"{package} pulled in {result['bad']}"


def test_platform_reaches_the_worker_side_only_through_the_contract_and_configs() -> None:
    """platform may import thinkforge.contract, jobs.config, jobs.checkpoints (pure) and
    serve.config; nothing else of jobs or serve (their modules pull in torch and Ray)."""
    allowed = {"thinkforge.jobs.config", "thinkforge.jobs.checkpoints", "thinkforge.serve.config"}
    allowed |= KNOWN_PLATFORM_REACHES
    graph = import_graph()
    reached = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("thinkforge.platform")
        for target in targets
        if target.startswith(("thinkforge.jobs", "thinkforge.serve")) and target not in allowed
    }
    assert reached == set()


# Not moved yet: the evaluation job's EvalConfig, a pydantic model like jobs.config's,
# that platform/evals.py validates requests with.
KNOWN_PLATFORM_REACHES = {"thinkforge.jobs.evaluate"}


def test_the_contract_imports_nothing_of_thinkforge_and_nothing_heavy() -> None:
    assert import_graph()["thinkforge.contract"] == set()
    code = """
import json, sys
import thinkforge.contract
heavy = ("torch", "ray", "sqlalchemy", "mlflow", "transformers", "pydantic", "fastapi")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_no_import_cycle_inside_thinkforge() -> None:
    """Every ``import`` of a thinkforge module counts, in functions too (a lazy import still
    ties the two modules together): the graph must be acyclic."""
    graph = import_graph()
    assert len(graph) > 30 and "thinkforge.serve.loader" in graph["thinkforge.serve.replica"]
    cycles = _cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]


def import_graph() -> dict[str, set[str]]:
    """thinkforge module -> the thinkforge modules it names in an import statement."""
    root = Path(thinkforge.__file__).parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in node.names:  # "from pkg import module" names the module
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(_one_cycle(graph, set(component), min(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _one_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A path start -> ... -> start inside one strongly connected component."""
    path, seen = [start], {start}
    while True:
        nxt = min(t for t in graph[path[-1]] if t in members)
        if nxt == start or nxt in seen:
            return [*path[path.index(nxt) :], nxt] if nxt != start else [*path, start]
        path.append(nxt)
        seen.add(nxt)

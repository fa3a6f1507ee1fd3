"""The import layers of the house (STYLE.md): front ends -> pipeline -> passes -> engine -> floor.

A module imports only from its own layer or below, the import graph has no cycle, and only
graph.py imports onnx_graphsurgeon. Imports under ``if TYPE_CHECKING:`` are type-only and
do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Higher imports lower. Same layer: allowed, as long as no cycle forms.
LAYERS: dict[str, int] = {
    **dict.fromkeys(["cli", "cli_options", "cli_tools", "api"], 5),
    **dict.fromkeys(["pipeline", "recipe", "report", "auto", "changes", "htmlreport"], 4),
    "passes": 3,
    **dict.fromkeys(["decompose", "sharing"], 2),
    **dict.fromkeys(["allocate", "sensitivity", "search", "measure", "stream", "moments",
                     "refit", "chain", "linear", "cp_als", "lowrank", "depgraph", "verify", "quant",
                     "fidelity", "ops", "importance", "outputs", "graphpass",
                     "bias_correction", "int8_fallback", "int8_speed", "rounding"], 1),
    **dict.fromkeys(["graph", "model", "weights", "runtime", "calibration", "capture", "synthetic",
                     "cost", "benchmark", "latency_cache", "errors", "passbase", "timing", "judge",
                     "serial", "executor", "provenance"], 0),
}


def _modules() -> dict[str, Path]:
    found = {f"onnxcomp.{p.stem}": p for p in (ROOT / "onnxcomp").glob("*.py")
             if p.stem != "__init__"}
    found.update({f"onnxcomp.passes.{p.stem}": p for p in (ROOT / "passes").glob("*.py")})
    return found


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for body in node.body for n in ast.walk(body))
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _layer(module: str) -> int:
    if module.startswith("onnxcomp.passes"):
        return LAYERS["passes"]
    return LAYERS[module.split(".")[1]]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _runtime_imports(p) if i in mods} - {m} for m, p in mods.items()}


def test_the_import_graph_is_read():
    graph = _graph()
    assert {"onnxcomp.linear", "onnxcomp.stream", "onnxcomp.allocate"} <= graph[
        "onnxcomp.decompose"]
    assert "onnxcomp.decompose" not in graph["onnxcomp.linear"]


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if not m.startswith("onnxcomp.passes")
               and m.split(".")[1] not in LAYERS]
    assert not missing, f"give these a layer in tests/test_layers.py: {missing}"


def test_imports_only_go_down():
    wrong = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
             for m, deps in _graph().items() for i in sorted(deps) if _layer(i) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*path[path.index(d):], d]))
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_only_graph_imports_graphsurgeon():
    users = [m for m, p in _modules().items()
             if any(i.startswith("onnx_graphsurgeon") for i in _runtime_imports(p))]
    assert users == ["onnxcomp.graph"]

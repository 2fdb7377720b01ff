"""The package's layers (DESIGN.md §2, STYLE 1): imports run downward only, with no import circle, and nothing in
core, numerics, dataplane or transport imports vllm, sglang or the reference model; core not even torch.

Two checks: a static one over every ``import`` statement in ``qroute/`` (function-level imports included, since a
lazy import that runs back up is still a dependency), and a dynamic one that imports every module of the lower
layers in a subprocess where the engines and the upper layers cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import qroute

PACKAGE = Path(qroute.__file__).parent
BASE = {"qroute", "qroute.errors", "qroute.metrics"}  # importable from every layer; they import only each other
# layer -> the layers it may import (besides itself and BASE)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "numerics": {"core"},
    "transport": {"core"},
    "dataplane": {"core", "numerics", "transport"},
    "reference": {"core", "numerics", "transport", "dataplane"},
    "plugin": {"core", "numerics", "transport", "dataplane"},
    "connectors": {"core", "numerics", "transport", "dataplane", "plugin"},
    "ops": {"core", "numerics", "transport", "dataplane", "reference", "plugin", "connectors", "bench"},
    "bench": {"core", "numerics", "transport", "dataplane", "reference", "plugin", "connectors", "ops"},
}
ENGINE_FREE = ["core", "numerics", "transport", "dataplane"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The qroute modules ``name`` imports (resolved to the longest known module name)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    return None if module in BASE else module.split(".")[1]


def test_every_module_belongs_to_a_layer():
    assert {_layer(m) for m in MODULES} - {None} == set(ALLOWED), sorted(MODULES)


def test_imports_run_downward_only():
    wrong = []
    for module, imported in GRAPH.items():
        layer = _layer(module)
        for target in imported:
            target_layer = _layer(target)
            if target_layer is None or target_layer == layer:
                continue
            if layer is None or target_layer not in ALLOWED[layer]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_circle():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_no_module_is_much_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 410}
    assert not long, long


def test_the_static_check_sees_lazy_and_relative_imports():
    """Negative control: the graph must contain a known function-level import."""
    assert "qroute.reference.tinymodel" in GRAPH["qroute.ops.cli"]  # imported inside a function
    assert "qroute.core.wire" in GRAPH["qroute.core.handshake"]


BLOCKER = """
import importlib, sys
blocked = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + '.') for b in blocked):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
failed = []
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        failed.append(f'{{module}}: {{exc}}')
print('\\n'.join(failed))
sys.exit(1 if failed else 0)
"""


def _import_blocked(modules: list[str], blocked: set[str]) -> subprocess.CompletedProcess:
    code = BLOCKER.format(modules=modules, blocked=sorted(blocked))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


UPPER = {f"qroute.{layer}" for layer in ("reference", "plugin", "connectors", "ops", "bench")}


@pytest.mark.parametrize("layer", ENGINE_FREE)
def test_lower_layers_import_without_engines_or_upper_layers(layer):
    modules = sorted(m for m in MODULES if _layer(m) == layer)
    result = _import_blocked(modules, {"vllm", "sglang", *UPPER})
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_imports_without_torch():
    modules = sorted(m for m in MODULES if _layer(m) == "core") + sorted(BASE)
    result = _import_blocked(modules, {"vllm", "sglang", "torch", *UPPER})
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cli_imports_without_engines():
    result = _import_blocked(["qroute.ops.cli"], {"vllm", "sglang"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_blocker_really_blocks():
    result = _import_blocked(["qroute.reference.tinymodel"], {"qroute.reference"})
    assert result.returncode != 0 and "blocked" in result.stdout

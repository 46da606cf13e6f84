"""The shape holds: no import circle in the host, the core imports no task module, plugins reach the host through
its one plugin-facing surface and never name a task they do not register themselves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from hf_tokplug.manager import installed_plugins, registries

from conftest import REPO

PACKAGE = REPO / "hf_tokplug"
PLUGIN_DIRS = [REPO / "plugins", REPO / "docs" / "tutorial_plugin"]
SURFACE = {"hf_tokplug", "hf_tokplug.plugin"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports (module level and inside functions; ``if TYPE_CHECKING:`` blocks skipped)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, *([child.module] if child.module else [])])
                found.append(base)
                found.extend(f"{base}.{alias.name}" for alias in child.names)  # `from . import toy` (a submodule)
            visit(child)

    visit(tree)
    return found


def _host_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def test_the_host_has_no_import_cycle():
    graph = _host_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_core_imports_no_task_module():
    graph = _host_graph()
    core = {m for m in graph if not m.startswith("hf_tokplug.runners")}
    offenders = {m: sorted(d for d in graph[m] if d.startswith("hf_tokplug.runners")) for m in core}
    assert not {m: d for m, d in offenders.items() if d}


def _plugin_files() -> list[Path]:
    return sorted(p for d in PLUGIN_DIRS for p in d.rglob("*.py"))


@pytest.mark.parametrize("path", _plugin_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_import_only_the_plugin_surface(path):
    host = [m for m in _imports(path) if m == "hf_tokplug" or m.startswith("hf_tokplug.")]
    # `from hf_tokplug.plugin import X` also lists `hf_tokplug.plugin.X`: only the module part matters
    modules = {m for m in host if m in SURFACE or not any(m.startswith(f"{s}.") for s in SURFACE)}
    assert modules <= SURFACE, f"{path} imports {sorted(modules - SURFACE)}; use hf_tokplug.plugin"


def _own_tasks(path: Path) -> set[str]:
    """Tasks registered by the plugin package ``path`` belongs to."""
    package = path.relative_to(REPO).parts[:2]
    owned = set()
    for name, cls in registries().runners.items():
        module = cls.__module__.replace("hf_tokplug_plugins", "plugins").split(".")
        if tuple(module[:2]) == package:
            owned.add(name)
    return owned


@pytest.mark.parametrize("path", _plugin_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_never_name_another_task(path):
    tasks = set(registries().runners) - _own_tasks(path)
    strings = [n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    named = sorted({t for t in tasks for s in strings if re.search(rf"\b{re.escape(t)}\b", s)})
    assert not named, f"{path} names task(s) {named}: check ctx.traits instead"


def test_builtin_tasks_come_from_the_host_entry_point():
    info = installed_plugins()["hf_tokplug"]
    assert info.source == "hf_tokplug.runners:BuiltinTasks" and info.dist == "hf-tokplug"
    assert {"causal_lm_sft", "masked_diffusion_sft", "diffusion_lora", "sequence_classification"} <= set(
        registries().runners)

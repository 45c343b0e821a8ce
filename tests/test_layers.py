"""The house rules (docs/design.md, "Layers"): imports only point down, no circles, torch-free folders stay so.

Every product module is parsed with `ast`; every `import` and `from ... import`
in it counts, also those inside functions (an import moved into a function to
dodge a circle is still a circle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from torch_block import BLOCK_TORCH

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "msfusion": REPO / "msfusion",
    "msfusion.coordinator": REPO / "coordinator",
    "msfusion.edge_runtime": REPO / "edge_runtime",
    "msfusion.export": REPO / "export",
    "msfusion.devices": REPO / "devices",
}

CORE = (
    "=msfusion",
    "msfusion.errors",
    "msfusion.atomic",
    "msfusion.progress",
    "msfusion.algorithm",
    "msfusion.wire",
    "msfusion.data",
)
# Layer of a module -> the layers (module-name prefixes) it may import. Longest prefix wins.
ALLOWED: dict[str, tuple[str, ...]] = {
    "msfusion": CORE,
    "msfusion.errors": ("msfusion.errors",),
    "msfusion.atomic": ("msfusion.atomic",),
    "msfusion.progress": ("msfusion.progress",),
    "msfusion.algorithm": ("msfusion.errors", "msfusion.algorithm"),
    "msfusion.wire": ("msfusion.errors", "msfusion.atomic", "msfusion.algorithm", "msfusion.wire"),
    # A data source reports its statistics in the wire schema's terms (DataReport, Preprocessing).
    "msfusion.data": ("msfusion.errors", "msfusion.atomic", "msfusion.data", "msfusion.wire.protocol"),
    "msfusion.models": (*CORE, "msfusion.models"),
    "msfusion.recipe": (*CORE, "msfusion.models.config"),
    "msfusion.export": (
        *CORE,
        "msfusion.models",
        "msfusion.recipe",
        "msfusion.export",
        "msfusion.edge_runtime.backends",
    ),
    "msfusion.edge_runtime": (*CORE, "msfusion.edge_runtime"),
    "msfusion.devices": (*CORE, "msfusion.edge_runtime.config", "msfusion.devices"),
    "msfusion.coordinator": ("*",),
}
# Folders whose every module imports without torch (edge_runtime's ExecuTorch and torch backends load it by design).
TORCH_FREE = [
    "msfusion.errors",
    "msfusion.atomic",
    "msfusion.progress",
    "msfusion.algorithm",
    "msfusion.wire",
    "msfusion.data",
    "msfusion.models.config",
    "msfusion.recipe",
    "msfusion.edge_runtime",
    "msfusion.devices",
]
TORCH_FREE_EXCEPT = {"msfusion.edge_runtime.backends.executorch", "msfusion.edge_runtime.backends.torch_native"}


def product_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "msfusion" and parts and f"msfusion.{parts[0]}" in FOLDERS:
                continue
            found[name] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("msfusion"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if not base.startswith("msfusion"):
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return out


MODULES = product_modules()
GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def _layer(name: str, table: dict[str, tuple[str, ...]]) -> str:
    return max((k for k in table if name == k or name.startswith(k + ".")), key=len)


def _under(name: str, prefix: str) -> bool:
    """Whether `name` is in the layer `prefix` ("=x": x alone, "*": everything)."""
    if prefix == "*" or name == prefix.lstrip("="):
        return True
    return not prefix.startswith("=") and name.startswith(prefix + ".")


def test_the_graph_sees_the_whole_product() -> None:
    assert {
        "msfusion.algorithm.planning",
        "msfusion.wire.protocol",
        "msfusion.edge_runtime.daemon",
        "msfusion.export.cache",
        "msfusion.coordinator.fleet.rounds",
        "msfusion.devices.flash",
    } <= set(MODULES)
    assert "msfusion.algorithm.spec" in GRAPH["msfusion.algorithm.planning"]


def test_every_import_points_down_the_layers() -> None:
    wrong = []
    for name, targets in GRAPH.items():
        allowed = ALLOWED[_layer(name, ALLOWED)]
        wrong += [f"{name} -> {t}" for t in sorted(targets) if not any(_under(t, a) for a in allowed)]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _package(name: str) -> str:
    """The folder a module sits in (`msfusion.coordinator.fleet.rounds` -> `msfusion.coordinator.fleet`)."""
    if MODULES[name].name == "__init__.py":
        return name
    parent = name.rsplit(".", 1)[0]
    # The root's own modules (errors, atomic, recipe) are layers of their own, not one package.
    return name if parent == "msfusion" else parent


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_only_the_ray_fleet_imports_ray() -> None:
    """Ray is the coordinator's dependency for `simulate --engine ray`; the boards never import it."""
    found = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.add(name)
    assert found == {"msfusion.coordinator.fleet.ray_fleet"}


def test_no_module_circles() -> None:
    graph = {n: {t for t in ts if t in MODULES and t != n} for n, ts in GRAPH.items()}
    assert not _cycles(graph)


def test_no_package_circles() -> None:
    graph: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        src = _package(name)
        graph.setdefault(src, set()).update(_package(t) for t in targets if t in MODULES and _package(t) != src)
    # A package importing its own subpackage is not a circle; one importing its parent package's modules is.
    assert not _cycles(graph)


def test_the_checker_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("folder", TORCH_FREE)
def test_torch_free_folders_import_without_torch(folder: str) -> None:
    modules = [n for n in MODULES if _under(n, folder) and n not in TORCH_FREE_EXCEPT]
    assert modules, folder
    script = BLOCK_TORCH.replace(
        "importlib.import_module(sys.argv[1])", "[importlib.import_module(m) for m in sys.argv[1:]]"
    )
    proc = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

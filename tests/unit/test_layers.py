"""DESIGN.md's layers, held: no import runs up them, the import graph has no circle, and the
platform side never reaches into the box's scheduler or engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "appliance"

# DESIGN.md "Layers": a module imports only from its own layer or the ones before it.
LAYERS = {
    "errors": 1, "settings": 1, "ota_settings": 1, "config_sources": 1, "tensors": 1, "text": 1, "": 1,
    "protocol": 2, "providers": 2,
    "engine": 3,
    "scheduler": 4,
    "dataplane": 5,
    "server": 6, "pool": 6, "ota": 6, "system": 6,
    "service": 7, "control": 7,
    "platform": 8,
    "cli": 9, "__main__": 9,  # the command line starts the box's service and the platform's
}  # fmt: skip
# platform/ is a separate service shipped in the same package: the wire format, the codec, the error
# table and the settings conventions, never what runs the box's models.
PLATFORM_MAY_NOT = ("scheduler", "engine", "providers", "dataplane.plane", "service", "control", "ota")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # TYPE_CHECKING imports count too
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t not in (name, "appliance")}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def test_no_import_runs_up_the_layers() -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(source)
    ]
    assert not upward, "imports up DESIGN.md's layers:\n" + "\n".join(sorted(upward))


def test_the_platform_side_uses_no_part_of_the_box_that_runs_models() -> None:
    reaching = [
        f"{source} -> {target}"
        for source, targets in _graph().items()
        if source.startswith("appliance.platform")
        for target in targets
        if target.removeprefix("appliance.").startswith(PLATFORM_MAY_NOT)
    ]
    assert not reaching, "\n".join(sorted(reaching))


def test_the_import_graph_has_no_circle() -> None:
    graph = _graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_platform_side_does_not_reach_the_box_through_what_it_imports() -> None:
    """The rule above holds for whole import chains too: a gateway (every platform module imported)
    loads none of the box's scheduler, engine or providers, nor ONNX Runtime (canaries import it when
    they first run: platform/golden.py). One shared helper importing the data plane would undo it."""
    platform = sorted(name for name in _modules() if name.startswith("appliance.platform"))
    probe = (
        "import importlib, sys\n"
        f"for name in {platform!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m == 'onnxruntime' or m.startswith(("
        "'appliance.scheduler', 'appliance.engine', 'appliance.providers', 'appliance.dataplane.plane')))))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.split() == []

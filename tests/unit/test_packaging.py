"""What a runtime-only install needs: every runtime import declared, the bundled models shipped."""

from __future__ import annotations

import ast
import importlib.util
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Imported only where present, with a fallback (uvloop comes with uvicorn[standard]).
OPTIONAL = {"uvloop"}


def _imports(package: Path, *, is_platform: bool | None = None) -> dict[str, str]:
    """Top-level module of every absolute import in the package -> a file that imports it; with
    `is_platform`, only the files inside (True) or outside (False) appliance/platform/."""
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        if is_platform is not None and ("platform" in path.relative_to(package).parts[:1]) != is_platform:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _requirement_name(requirement: str) -> str:
    for stop in "[<>=!~ ;":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower().replace("_", "-")


def test_every_runtime_import_is_a_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {"starlette", "pydantic-core"}  # what fastapi and pydantic guarantee, by their own pins
    # appliance/platform/ is a separate service: it may also use the `platform` extra.
    platform = {_requirement_name(r) for r in project.get("optional-dependencies", {}).get("platform", [])}
    distributions = packages_distributions()
    missing = []
    for is_platform, allowed in ((False, declared), (True, declared | platform)):
        for module, where in _imports(ROOT / "appliance", is_platform=is_platform).items():
            if module in sys.stdlib_module_names or module == "appliance" or module in OPTIONAL:
                continue
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & allowed:
                missing.append(f"{module} ({where}; distribution {sorted(names)})")
    assert not missing, f"imported at run time but not in [project] dependencies: {missing}"


def test_the_wheel_ships_every_bundled_model() -> None:
    spec = importlib.util.spec_from_file_location("appliance_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    shipped = {path.relative_to(ROOT / "models").as_posix() for path in setup.bundled_files()}
    for model in ("surface_defect", "surface_defect_fp32", "surface_defect_224", "surface_defect_224_u8"):
        assert {f"{model}/model.toml", f"{model}/1/model.onnx", f"{model}/1/samples.npz"} <= shipped
    assert not any(name.startswith("recipe/") for name in shipped)

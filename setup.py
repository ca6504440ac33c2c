"""Ships the bundled reference models (the top-level `models/` repository) inside the wheel.

The repository stays at the top of the source tree, beside the recipe that builds it; a wheel or a
non-editable install needs it inside the package, as `appliance/bundled_models/`, so that
`appliance serve` with no arguments serves it (appliance/settings.py looks there first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE = Path(__file__).resolve().parent / "models"
TARGET = "appliance/bundled_models"
SHIPPED = ("model.toml", "config.pbtxt", "*/model.onnx", "*/samples.npz")


class BuildWithModels(build_py):
    """build_py, then a copy of every model folder's manifest, version files and golden samples."""

    def run(self) -> None:
        super().run()
        for path in bundled_files():
            destination = Path(self.build_lib) / TARGET / path.relative_to(SOURCE)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)


def bundled_files() -> list[Path]:
    files: list[Path] = []
    for model in sorted(p for p in SOURCE.iterdir() if p.is_dir() and p.name != "recipe"):
        for pattern in SHIPPED:
            files.extend(sorted(model.glob(pattern)))
    return files


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import bundled_files
    setup(cmdclass={"build_py": BuildWithModels})

"""models/recipe's scripts import one another by name, their folder on sys.path as when run; tests import
them the same way, with that folder first: ONNX Runtime's quantisation tools put their own transformers
folder on sys.path, and its metrics.py would otherwise shadow the recipe's."""

from __future__ import annotations

import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "models" / "recipe"


def recipe_first() -> Path:
    folder = str(RECIPE)
    while folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)
    return RECIPE

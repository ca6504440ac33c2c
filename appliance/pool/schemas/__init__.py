"""The JSON Schemas of every pool payload, shipped with the package for nodes, platforms and tests."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

NAMES = ("birth", "state", "capacity", "evt", "job_request", "job_response", "command_reply", "gateway_evt")


@cache
def load(name: str) -> dict[str, Any]:
    """The schema called `name` (one of NAMES) as a dict; ValueError for an unknown name."""
    if name not in NAMES:
        raise ValueError(f"no pool schema called {name!r}; known: {', '.join(NAMES)}")
    text = resources.files(__package__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)

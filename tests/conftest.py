"""Shared fixtures: tiny ONNX repositories in tmp_path and Settings built from init kwargs only."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The test-only provider plugins ('fake' and 'broken') are found from their fixture folder, with its
# dist-info, by this process only: they are never installed into the venv `make run` serves from.
sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "fake_provider"))

import holds
import modelzoo
from services import make_settings

from appliance.settings import Settings


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A repository with every kind of model the server must serve or refuse."""
    return modelzoo.standard_repository(tmp_path / "repo")


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    def factory(repository: Path, **sections: dict[str, Any]) -> Settings:
        return make_settings(tmp_path, repository, **sections)

    return factory


@pytest.fixture
def batches() -> Iterator[holds.Batches]:
    """Every batch the workers of this process run, and a way to hold some (tests/holds.py)."""
    with holds.installed() as recorder:
        yield recorder

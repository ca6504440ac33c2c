"""Shared fixtures: tiny ONNX repositories in tmp_path and Settings built from init kwargs only."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The test-only provider plugins ('fake' and 'broken') are found from their fixture folder, with its
# dist-info, by this process only: they are never installed into the venv `make run` serves from.
sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "fake_provider"))

import modelzoo

from appliance.settings import Settings


def make_settings(tmp_path: Path, repository: Path, **sections: dict[str, Any]) -> Settings:
    """Settings from init kwargs only (never os.environ or /etc), with every directory under tmp_path."""
    data: dict[str, dict[str, Any]] = {
        "models": {"repository": repository},
        "scheduler": {"instances": 2},
        "system": {
            "state_dir": tmp_path / "state",
            "cache_dir": tmp_path / "cache",
            "runtime_dir": tmp_path / "run",
        },
        "server": {"port": 0},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Settings(**data)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A repository with every kind of model the server must serve or refuse."""
    return modelzoo.standard_repository(tmp_path / "repo")


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    def factory(repository: Path, **sections: dict[str, Any]) -> Settings:
        return make_settings(tmp_path, repository, **sections)

    return factory

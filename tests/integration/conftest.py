"""Fixtures of a real service (tests/services.py: uvicorn on a pre-bound socket, real ORT, a thread)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from services import RunningService, run_service

from appliance.settings import Settings

__all__ = ["RunningService", "run_service"]


@pytest.fixture
def serve(settings_factory: Callable[..., Settings]) -> Callable[..., Any]:
    """serve(repository, **sections) as a context manager yielding a RunningService."""

    def factory(repository: Path, **sections: dict[str, Any]) -> Any:
        return run_service(settings_factory(repository, **sections))

    return factory


@pytest.fixture
def server(serve: Callable[..., Any], repository: Path) -> Iterator[RunningService]:
    with serve(repository) as running:
        yield running


@pytest.fixture
def client(server: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        yield http

"""`python -m appliance serve` as a real subprocess, for what only a process can show (SIGKILL, restarts)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from subprocesses import READY, Process, appliance, environment

__all__ = ["READY", "Process", "node_environment", "node_process"]


def node_environment(tmp_path: Path, pool: dict[str, object]) -> dict[str, str]:
    """The environment of a node whose state directory survives restarts (same tmp_path)."""
    return environment(tmp_path, **{f"pool__{key}": str(value) for key, value in pool.items()})


@contextmanager
def node_process(repository: Path, env: dict[str, str]) -> Iterator[Process]:
    with appliance(["serve", "--model-repository", str(repository), "--port", "0"], repository, env) as node:
        yield node

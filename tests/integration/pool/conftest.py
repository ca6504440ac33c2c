"""Fixtures of the pool tests: a real broker per test, unique topic names, recorders checking schemas."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import modelzoo
import pytest
import pytest_asyncio
from pool_brokers import Broker, default_kind, tls_files
from pool_recorder import Names, Recorder


@pytest.fixture
def pool_repository(tmp_path: Path) -> Path:
    """One batchable model, as most pool tests serve."""
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 8\n")
    return repo


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """broker_factory(kind=None, tls=, users=, acl=, persistent=, start=) -> a Broker, stopped after the
    test; `acl` is the text of a mosquitto acl_file."""
    started: list[Broker] = []

    def factory(
        kind: str | None = None,
        *,
        tls: bool = False,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        persistent: bool = False,
        start: bool = True,
    ) -> Broker:
        directory = tmp_path / f"broker{len(started)}"
        directory.mkdir()
        broker = Broker(kind or default_kind(), directory, is_persistent=persistent)
        if broker.kind == "amqtt" and (tls or users or acl):
            pytest.skip("TLS, password and ACL files are set up for mosquitto only")
        if users and shutil.which("mosquitto_passwd") is None:
            pytest.skip("mosquitto_passwd (package mosquitto) is not installed: no password file")
        if tls:
            broker.tls = tls_files(directory)
        if users:
            broker.password_file = directory / "passwords"
            for user, password in users.items():
                flags = ["-b"] if broker.password_file.exists() else ["-c", "-b"]
                subprocess.run(
                    ["mosquitto_passwd", *flags, str(broker.password_file), user, password], check=True
                )
        if acl is not None:
            broker.acl_file = directory / "acl"
            broker.acl_file.write_text(acl)
        started.append(broker)
        if start:
            broker.start()
        return broker

    yield factory
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory()


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    node = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return Names("ecp/v1", f"t{uuid.uuid4().hex[:8]}", node)


@pytest_asyncio.fixture
async def recorder_factory() -> Any:
    """recorder_factory(broker, names, *topics) -> a connected Recorder (default: the node's topics)."""
    made: list[Recorder] = []

    async def factory(broker: Broker, names: Names, *topics: str, **kwargs: Any) -> Recorder:
        credentials = {k: kwargs.pop(k) for k in ("username", "password") if k in kwargs}
        recorder = Recorder(broker, names, **kwargs)
        made.append(recorder)
        return await recorder.connect(*topics, **credentials)

    yield factory
    for recorder in made:
        recorder.close()
    problems = [problem for recorder in made for problem in recorder.invalid]
    assert not problems, "payloads that break their schema:\n" + "\n".join(problems)

"""The platform side against real nodes: `pool submit`, `pool watch`, and ingest sharing a subscription."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pool_brokers import Broker
from pool_recorder import Names, pool_section

from appliance.platform import cli
from appliance.platform.client import PlatformClient
from appliance.platform.watch import watch


def connection_args(broker: Broker, names: Names) -> list[str]:
    return ["--broker", broker.url, "--topic-root", names.root, "--site", names.site]


@pytest.mark.asyncio
async def test_submit_picks_a_node_and_prints_the_result(
    serve: Callable[..., Any],
    pool_repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "x.npy", x)
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)):
        await recorder.node("capacity")
        argv = [
            "submit",
            *connection_args(broker, names),
            "--model",
            "batchable",
            "--input",
            str(tmp_path / "x.npy"),
        ]
        assert await asyncio.to_thread(cli.main, [*argv, "--output", str(tmp_path / "out.npz")]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["node"] == f"{names.site}/{names.node}"
        assert printed["outputs"]["y"]["shape"] == [3, 4]
        np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["y"], x * 2 + 1)

        assert await asyncio.to_thread(cli.main, ["watch", *connection_args(broker, names), "--once"]) == 0
        table = capsys.readouterr().out
        assert f"{names.site}/{names.node}" in table and "online" in table and "batchable" in table

        unknown = [
            "submit",
            *connection_args(broker, names),
            "--model",
            "nosuch",
            "--input",
            str(tmp_path / "x.npy"),
        ]
        assert await asyncio.to_thread(cli.main, unknown) == 2
        assert "no online node" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_submit_never_truncates_outputs_silently(
    serve: Callable[..., Any],
    pool_repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    x = np.arange(32, dtype=np.float32).reshape(8, 4)  # y has 32 elements: more than are printed
    np.save(tmp_path / "x.npy", x)
    recorder = await recorder_factory(broker, names)
    # Nodes that only answer under _reply/ still answer `submit`.
    pool = pool_section(broker, names, reply_topic_prefix=f"{names.root}/_reply/")
    with serve(pool_repository, pool=pool):
        await recorder.node("capacity")
        argv = [
            "submit",
            *connection_args(broker, names),
            "--model",
            "batchable",
            "--input",
            str(tmp_path / "x.npy"),
        ]
        y = (x * 2 + 1).reshape(-1).tolist()

        assert await asyncio.to_thread(cli.main, argv) == 0
        printed = json.loads(capsys.readouterr().out)["outputs"]
        assert printed["y"]["data"] == y[:16] and printed["y"]["shape"] == [8, 4]
        assert printed["y"]["elided"].startswith("16 of 32 elements not shown")
        assert "--output FILE.npz" in printed["y"]["elided"] and "--full" in printed["y"]["elided"]
        assert "elided" not in printed["s"]  # 8 elements: printed whole

        output = tmp_path / "out.npz"
        assert await asyncio.to_thread(cli.main, [*argv, "--output", str(output)]) == 0
        printed = json.loads(capsys.readouterr().out)["outputs"]
        assert f"the whole output is in {output}" in printed["y"]["elided"]
        np.testing.assert_array_equal(np.load(output)["y"], x * 2 + 1)

        assert await asyncio.to_thread(cli.main, [*argv, "--full"]) == 0
        printed = json.loads(capsys.readouterr().out)["outputs"]
        assert printed["y"]["data"] == y and "elided" not in printed["y"]


class Lines:
    """A text sink for `watch --json` that tells the test how many lines all sinks got together."""

    def __init__(self, counter: threading.Condition, totals: list[int]) -> None:
        self.lines: list[str] = []
        self._counter, self._totals = counter, totals

    def write(self, text: str) -> None:
        with self._counter:
            self.lines += [line for line in text.splitlines() if line]
            self._totals[0] += text.count("\n")
            self._counter.notify_all()

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.mark.asyncio
async def test_two_ingest_consumers_share_one_subscription(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    if not broker.is_v5:
        pytest.skip("shared subscriptions are MQTT 5")
    group = f"ingest-{uuid.uuid4().hex[:6]}"
    counter, totals, stop = threading.Condition(), [0], threading.Event()
    sinks = [Lines(counter, totals), Lines(counter, totals)]
    clients = [PlatformClient(broker.url).connect() for _ in sinks]

    def consume(client: PlatformClient, sink: Lines) -> int:
        return watch(client, root=names.root, site=names.site, group=group, as_json=True, out=sink, stop=stop)

    consumers = [asyncio.to_thread(consume, c, s) for c, s in zip(clients, sinks, strict=True)]
    tasks = [asyncio.ensure_future(c) for c in consumers]
    try:
        recorder = await recorder_factory(broker, names)
        with serve(pool_repository, pool=pool_section(broker, names, report_interval_s=0.2)):
            await recorder.node("birth")

            def enough() -> bool:
                with counter:
                    return counter.wait_for(lambda: totals[0] >= 12, 30)

            assert await asyncio.to_thread(enough)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for client in clients:
            client.close()
    seen = [
        {(r["kind"], r["document"]["session"], r["document"]["seq"]) for r in map(orjson.loads, sink.lines)}
        for sink in sinks
    ]
    assert all(seen) and not seen[0] & seen[1]  # each message reached exactly one member of the group
    sequence = sorted(seq for _, _, seq in seen[0] | seen[1])
    assert sequence == sorted(set(sequence))

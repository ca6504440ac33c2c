"""cmd/bench: the platform measures a node's curve at pool priority, only with pool.remote_control."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pool_brokers import Broker
from pool_recorder import Names, ask, assert_line_serves, pool_section, validate


@pytest.mark.asyncio
async def test_bench_measures_at_pool_priority_and_checks_its_arguments(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names, remote_control=True)) as running:
        await recorder.node("birth")
        request = {"model": "batchable", "duration_s": 0.3, "clients": [1, 2]}
        answer = await ask(recorder, names, "bench", orjson.dumps(request))
        validate("command_reply", answer.document)
        assert answer.document["status"] == 200, answer.document
        measured = answer.document["models"]["batchable"]
        assert [point["clients"] for point in measured["curve"]] == [1, 2]
        assert all(point["answered"] > 0 and point["rows_per_s"] > 0 for point in measured["curve"])
        assert measured["offer"]["max_ips_at_slo"] > 0
        stats = running.service.hub.scheduler("batchable").stats
        assert stats.requests[("pool", "success")] >= sum(p["answered"] for p in measured["curve"])
        for payload, status in (
            (b'{"duration_s": 1e9}', 400),
            (b'{"duration_s": NaN}', 400),
            (b'{"clients": [0]}', 400),
            (orjson.dumps({"clients": list(range(1, 20))}), 400),
            (b'{"model": "nosuch"}', 404),
            (b'{"surprise": 1}', 400),
        ):
            refused = await ask(recorder, names, "bench", payload)
            validate("command_reply", refused.document)
            assert refused.document["status"] == status, (payload, refused.document)
        await assert_line_serves(running.url)

"""`appliance platform gateway` as a real process: settings from flags and environment, SIGTERM exits 0."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
from pool_brokers import Broker
from pool_recorder import Names
from subprocesses import appliance, environment


def test_the_gateway_command_serves_and_stops_cleanly(tmp_path: Path, broker: Broker, names: Names) -> None:
    env = environment(tmp_path, gateway__topic_root=names.root, gateway__gateway_id="gw-process")
    argv = ["platform", "gateway", "--broker", broker.url, "--port", "0"]
    with appliance(argv, tmp_path, env) as gateway:
        url = gateway.url()
        assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
        fleet = httpx.get(f"{url}/v2/pool/nodes", timeout=10).json()
        assert fleet["gateway"] == "gw-process" and fleet["nodes"] == []
        gateway.popen.send_signal(signal.SIGTERM)
        assert gateway.popen.wait(30) == 0


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = environment(tmp_path, gateway__prot="1")
    with appliance(["platform", "gateway", "--broker", "mqtt://127.0.0.1:1"], tmp_path, env) as gateway:
        gateway.wait_for(
            re.compile(re.escape("unknown setting 'gateway.prot' (from APPLIANCE_GATEWAY__PROT)"))
        )
        assert gateway.popen.wait(30) == 2
